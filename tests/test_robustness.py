"""certified_radius / certified_accuracy against independent oracles: the exact
distance to a linear model's decision boundary, and attacks that must fail
within every certified radius."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
import tfconvnorm.models  # noqa: F401  (lipschitz_convnet)


def _linear_model(rng, d=6, k=4, bias=True):
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(k, use_bias=bias)])
    weights = [rng.standard_normal((d, k))] + ([rng.standard_normal(k)] if bias else [])
    model.set_weights(weights)
    return model


def _boundary_distance(weights, bias, x):
    """Exact l2 distance from each x to the set where its top class changes."""
    scores = x @ weights + bias
    top = np.argmax(scores, axis=1)
    distances = []
    for scores_i, c in zip(scores, top):
        distances.append(min((scores_i[c] - scores_i[j]) / np.linalg.norm(weights[:, c] - weights[:, j])
                             for j in range(weights.shape[1]) if j != c))
    return np.array(distances)


@pytest.mark.parametrize("bias", [True, False])
def test_radius_is_within_the_exact_distance_to_a_linear_boundary(rng, bias):
    model = _linear_model(rng, bias=bias)
    x = rng.standard_normal((200, 6)).astype(np.float32)
    weights = model.get_weights()[0].astype(np.float64)
    offset = model.get_weights()[1].astype(np.float64) if bias else 0.0
    exact = _boundary_distance(weights, offset, x.astype(np.float64))
    radius = tfconvnorm.certified_radius(model, x)
    assert radius.shape == (200,) and radius.dtype == np.float64
    assert np.all(radius <= exact * (1 + 1e-5) + 1e-7)
    # The certificate is the margin over sqrt(2) ||W||_2: never below that share
    # of the exact distance (||w_c - w_j|| <= sqrt(2) ||W||_2).
    norm = np.linalg.norm(weights, 2)
    top2 = np.sort(x @ weights + offset, axis=1)[:, -2:]
    np.testing.assert_allclose(radius, (top2[:, 1] - top2[:, 0]) / (math.sqrt(2) * norm),
                               rtol=1e-4, atol=1e-6)
    # A given Lipschitz constant is used as it is.
    np.testing.assert_allclose(tfconvnorm.certified_radius(model, x, lipschitz=2.0),
                               (top2[:, 1] - top2[:, 0]) / (2 * math.sqrt(2)), rtol=1e-5,
                               atol=1e-6)


def _digits_model(rng):
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    x = (digits.images[..., None] / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    keras.utils.set_random_seed(0)
    # Lipschitz by construction (10, so that cross-entropy trains it): radii
    # large enough for the attacks to have something to beat.
    model = tfconvnorm.models.lipschitz_convnet((8, 8, 1), 10, lipschitz=10.0, widths=(8,),
                                                activation="maxmin")
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1200], y[:1200], epochs=5, batch_size=64, verbose=0)
    return model, x[1200:1400], y[1200:1400]


def _pgd_l2(model, x, y, eps, steps=40, restarts=2, seed=0):
    """Untargeted PGD in l2 on the margin (an oracle of its own: plain TF)."""
    rng = np.random.default_rng(seed)
    x = tf.constant(x)
    broken = np.zeros(len(x), bool)
    for restart in range(restarts):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        noise *= (eps * (0.5 if restart else 0.0)
                  / np.linalg.norm(noise.reshape(len(x), -1), axis=1)).reshape(-1, 1, 1, 1)
        delta = tf.Variable(noise)
        for _ in range(steps):
            with tf.GradientTape() as tape:
                logits = model(x + delta, training=False)
                true = tf.gather(logits, y, batch_dims=1)
                other = tf.reduce_max(logits - 1e9 * tf.one_hot(y, 10), axis=1)
                loss = tf.reduce_sum(other - true)
            grad = tape.gradient(loss, delta).numpy()
            norms = np.linalg.norm(grad.reshape(len(x), -1), axis=1).reshape(-1, 1, 1, 1)
            step = delta.numpy() + (2.5 * eps / steps) * grad / np.maximum(norms, 1e-12)
            size = np.linalg.norm(step.reshape(len(x), -1), axis=1).reshape(-1, 1, 1, 1)
            delta.assign(step * np.minimum(1.0, eps / np.maximum(size, 1e-12)))
            predicted = np.argmax(model(x + delta, training=False).numpy(), axis=1)
            broken |= predicted != y
    return broken


def test_no_attack_beats_a_certified_radius(rng):
    model, x, y = _digits_model(rng)
    lipschitz = float(tfconvnorm.lipschitz_bound(model))
    radius = tfconvnorm.certified_radius(model, x)
    predicted = np.argmax(model(x, training=False).numpy(), axis=1)
    clean = np.mean(predicted == y)
    assert clean > 0.8  # a model worth attacking
    accuracies = tfconvnorm.certified_accuracy(model, (x, y), [0.0, 0.05, 0.1, 0.25])
    assert accuracies[0.0] == pytest.approx(clean)
    assert accuracies[0.1] > 0.3  # certificates to attack, not a vacuous check
    for eps in (0.05, 0.1, 0.25):
        certified = (predicted == y) & (radius >= eps)
        assert accuracies[eps] == pytest.approx(np.mean(certified))
        broken = _pgd_l2(model, x, y, eps)
        # A certified example that an attack breaks within eps is a bug.
        assert not np.any(certified & broken), eps
        assert accuracies[eps] <= np.mean(~broken)
    # Random directions within each radius never change the prediction either.
    for _ in range(5):
        direction = rng.standard_normal(x.shape).astype(np.float32)
        direction /= np.linalg.norm(direction.reshape(len(x), -1), axis=1).reshape(-1, 1, 1, 1)
        moved = x + 0.999 * radius.astype(np.float32).reshape(-1, 1, 1, 1) * direction
        assert np.all(np.argmax(model(moved, training=False).numpy(), axis=1) == predicted)
    # The radius is the margin over sqrt(2) L.
    logits = np.sort(model(x, training=False).numpy().astype(np.float64), axis=1)
    np.testing.assert_allclose(radius, (logits[:, -1] - logits[:, -2]) / (math.sqrt(2) * lipschitz))


def test_certified_accuracy_takes_datasets_and_one_hot_labels(rng):
    model = _linear_model(rng)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    expected = tfconvnorm.certified_accuracy(model, (x, y), 0.1)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    assert tfconvnorm.certified_accuracy(model, dataset, 0.1) == pytest.approx(expected)
    assert tfconvnorm.certified_accuracy(model, (x, np.eye(4)[y]), 0.1) == pytest.approx(expected)
    assert tfconvnorm.certified_accuracy(model, (x, y), (0.1,)) == {0.1: pytest.approx(expected)}
    assert tfconvnorm.certified_accuracy(model, (x, y), 1e9) == 0.0


def test_bad_arguments_name_themselves(rng):
    model = _linear_model(rng)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=r"`eps` must be a finite number >= 0; received eps=-0.1"):
        tfconvnorm.certified_accuracy(model, (x, np.zeros(5)), -0.1)
    with pytest.raises(ValueError, match=r"`lipschitz` must be a finite number > 0; received "
                                         r"lipschitz=0"):
        tfconvnorm.certified_radius(model, x, lipschitz=0)
    with pytest.raises(ValueError, match=r"labels must be class indices of shape \(5,\)"):
        tfconvnorm.certified_accuracy(model, (x, np.zeros(4)), 0.1)
    with pytest.raises(ValueError, match="`eps` is empty"):
        tfconvnorm.certified_accuracy(model, (x, np.zeros(5)), [])
    one_output = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="at least 2 classes; it gave shape"):
        tfconvnorm.certified_radius(one_output, x)
    with pytest.raises(ValueError, match="`x` must be a batch of inputs"):
        tfconvnorm.certified_radius(model, 3.0)
