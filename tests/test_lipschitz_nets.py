"""Networks Lipschitz by construction: the certificate holds for every option,
before and after training, and MaxMin is what its rule says."""

import keras
import numpy as np
import pytest

import tfconvnorm
from tfconvnorm import models
from tfconvnorm.models import lipschitz_nets


def _fit_hard(model, rng, steps=3):
    """A few large steps that push unconstrained kernels far out."""
    x = rng.standard_normal((8 * steps,) + model.input_shape[1:]).astype(np.float32)
    y = rng.integers(0, model.output_shape[-1], len(x))
    model.compile(keras.optimizers.SGD(1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return x


@pytest.mark.parametrize("build,activation,lipschitz,method", [
    (lambda **kw: models.lipschitz_convnet((8, 8, 1), 10, widths=(8, 16), **kw), "relu", 1.0,
     "rescale"),
    pytest.param(lambda **kw: models.lipschitz_convnet((9, 9, 2), 3, widths=(4,), **kw),
                 "maxmin", 2.5, "alternating", marks=pytest.mark.slow),
    pytest.param(lambda **kw: models.lipschitz_resnet((8, 8, 3), 10, 8, width=4, **kw), "relu",
                 1.0, "rescale", marks=pytest.mark.slow),
    # ("exact" keeps the bound the same way, by the final certified rescale, but
    # its Dykstra loop runs up to 500 clips per kernel and step: too slow here.)
    pytest.param(lambda **kw: models.lipschitz_resnet((7, 7, 1), 4, 8, width=4, **kw),
                 "maxmin", 0.5, "rescale", marks=pytest.mark.slow),
])
def test_the_certificate_holds_before_and_after_training(build, activation, lipschitz, method,
                                                         rng):
    model = build(activation=activation, lipschitz=lipschitz, method=method)
    bound = tfconvnorm.lipschitz_bound(model)
    assert float(bound) <= lipschitz
    # Every factor is a rule of the certificate, nothing taken on trust.
    assert not any("layer_bounds" in f.reason for f in bound.layers)
    x = _fit_hard(model, rng)
    after = float(tfconvnorm.lipschitz_bound(model))
    assert after <= lipschitz
    # Not trivially certified by collapsing to zero.
    assert after >= 0.05 * lipschitz
    empirical = tfconvnorm.empirical_lower_bound(model, x[:16])
    assert float(empirical) <= after * (1 + 1e-5)


def test_maxmin_sorts_pairs_and_keeps_norms(rng):
    layer = lipschitz_nets.MaxMin()
    x = rng.standard_normal((5, 3, 3, 6)).astype(np.float32)
    out = keras.ops.convert_to_numpy(layer(x))
    a, b = x[..., :3], x[..., 3:]
    np.testing.assert_array_equal(out, np.concatenate([np.maximum(a, b), np.minimum(a, b)], -1))
    # 1-Lipschitz on random pairs, and an isometry of each pair's entries.
    y = x + 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    out_y = keras.ops.convert_to_numpy(layer(y))
    assert np.all(np.linalg.norm((out - out_y).reshape(5, -1), axis=1)
                  <= np.linalg.norm((x - y).reshape(5, -1), axis=1) * (1 + 1e-6))
    np.testing.assert_allclose(np.linalg.norm(out.reshape(5, -1), axis=1),
                               np.linalg.norm(x.reshape(5, -1), axis=1), rtol=1e-6)
    with pytest.raises(ValueError, match="even number of channels"):
        lipschitz_nets.MaxMin()(np.zeros((1, 3), np.float32))


def test_lipschitz_models_round_trip_through_keras_files(tmp_path, rng):
    model = models.lipschitz_resnet((8, 8, 1), 5, 8, width=4, activation="maxmin", lipschitz=2.0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = rng.standard_normal((2, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-6)
    assert float(tfconvnorm.lipschitz_bound(loaded)) <= 2.0
    assert any(isinstance(l, lipschitz_nets.MaxMin) for l in loaded.layers)


@pytest.mark.parametrize("kwargs,message", [
    (dict(lipschitz=0), r"`lipschitz` must be a finite number > 0; received lipschitz=0"),
    (dict(activation="tanh"), r"`activation` must be one of \('relu', 'maxmin'\); received "
                              r"activation='tanh'"),
    (dict(method="paper"), r"`method` must be one that keeps the bound certified.*"
                           r"received method='paper'"),
    (dict(num_classes=1), r"`num_classes` must be an int >= 2; received num_classes=1"),
    (dict(input_shape=(8, 8)), r"`input_shape` must be \(height, width, channels\)"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    args = dict(input_shape=(8, 8, 1), num_classes=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        models.lipschitz_convnet(**args)
    with pytest.raises(ValueError, match=message):
        models.lipschitz_resnet(depth=8, **args)
    with pytest.raises(ValueError, match=r"`depth` must be 6n \+ 2.*received depth=10"):
        models.lipschitz_resnet((8, 8, 1), 10, 10)
