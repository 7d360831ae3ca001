"""tfconvnorm.lipschitz: a certified Lipschitz bound for whole Keras models.

Oracles: the explicit matrix of a purely linear model (its Jacobian, from the
model applied to basis vectors), empirical lower bounds on random nonlinear
models (gradient ascent on ||f(x) - f(y)|| / ||x - y|| and Jacobian power
iteration, which no upper bound may be below), Keras' own activation
functions on a fine grid, and Keras pooling layers applied to basis vectors.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from tfconvnorm import lipschitz
from tfconvnorm import reference

L = keras.layers


def _randomise_batch_norms(model, rng):
    """Random inference statistics, so that BN is not the identity."""
    for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
        if isinstance(layer, L.BatchNormalization):
            channels = layer.moving_variance.shape[0]
            layer.moving_variance.assign(rng.uniform(0.1, 3.0, channels).astype(np.float32))
            layer.moving_mean.assign(rng.normal(size=channels).astype(np.float32))
            if layer.scale:
                layer.gamma.assign(rng.uniform(-2.0, 2.0, channels).astype(np.float32))


def _residual_model():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same")(inputs)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.Conv2D(6, 3, padding="same", activation="relu")(x)
    y = L.BatchNormalization()(y)
    x = L.Add()([x, y])
    z = L.DepthwiseConv2D(3, strides=2, padding="same", activation="tanh")(x)
    w = L.AveragePooling2D(2, padding="valid")(x)
    x = L.Concatenate()([z, w])
    x = L.MaxPooling2D(3, 1, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(4, activation="softmax")(x))


def _strided_model():
    inputs = keras.Input((9, 9, 2))
    x = L.Conv2D(4, 3, strides=2, padding="valid", use_bias=False)(inputs)
    x = L.BatchNormalization(scale=False)(x)
    x = L.LeakyReLU(0.2)(x)
    a = L.Conv2D(4, 1, activation="gelu")(x)
    b = L.AveragePooling2D(3, strides=2, padding="same")(x)
    b = L.UpSampling2D(2)(b)
    b = L.Cropping2D(((0, 0), (0, 0)))(b)
    x = L.Maximum()([a, b[:, :4, :4, :]])
    x = L.Subtract()([x, L.Conv2D(4, 3, padding="same", activation="silu")(x)])
    x = L.Flatten()(x)
    x = L.Dropout(0.5)(x)
    return keras.Model(inputs, L.Dense(3, activation="elu")(x))


def _sequential_model():
    return keras.Sequential([
        keras.Input((10, 3)),
        L.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="sigmoid"),
        L.SeparableConv1D(4, 3, strides=2, padding="same"),
        L.BatchNormalization(),
        L.Activation("hard_silu"),
        L.MaxPooling1D(2),
        L.GlobalMaxPooling1D(),
        L.Rescaling(0.5),
        L.Dense(2, activation="selu"),
    ])


@pytest.mark.parametrize("build", [_residual_model, _strided_model, _sequential_model])
def test_empirical_lower_bounds_never_exceed_the_bound(build, rng):
    keras.utils.set_random_seed(int(rng.integers(1 << 30)))
    model = build()
    _randomise_batch_norms(model, rng)
    bound = float(lipschitz.lipschitz_bound(model))
    assert np.isfinite(bound) and bound > 0
    x = rng.standard_normal((16,) + tuple(model.input_shape[1:])).astype(np.float32)
    # Every search runs (free pairs shortened: test_free_pairs_* checks their reach).
    empirical = lipschitz.empirical_lower_bound(model, x, pairs_steps=40,
                                                jacobian_iterations=40, free_pairs_steps=10)
    assert 0 < empirical <= bound * (1 + 1e-6)


def test_free_pairs_find_a_steeper_region_away_from_the_data(rng):
    """f(x) = 5 relu(x1 - 10) + x2: gain 1 wherever the data are (x near 0),
    sqrt(26) beyond x1 = 10. Searches that keep x at the data cannot see
    that region; pairs started far enough apart to span the kink move into it."""
    model = keras.Sequential([keras.Input((2,)), L.Dense(2, activation="relu"), L.Dense(1)])
    model.layers[0].set_weights([np.eye(2, dtype=np.float32),
                                 np.array([-10.0, 100.0], np.float32)])
    model.layers[1].set_weights([np.array([[5.0], [1.0]], np.float32),
                                 np.array([-100.0], np.float32)])
    x = rng.standard_normal((8, 2)).astype(np.float32)
    local = lipschitz.empirical_lower_bound(model, x, free_pairs_steps=0)
    free = lipschitz.empirical_lower_bound(model, x, free_pair_distance=30.0)
    assert local == pytest.approx(1.0, rel=1e-3)
    assert 2.0 < free <= np.sqrt(26.0) * (1 + 1e-5)
    assert free <= float(lipschitz.lipschitz_bound(model)) * (1 + 1e-6)


@pytest.mark.parametrize("argument,value", [("free_pair_distance", 0.0),
                                            ("free_pair_distance", float("nan")),
                                            ("free_pairs_steps", -1), ("pairs_steps", 2.5)])
def test_empirical_lower_bound_rejects_bad_arguments(argument, value):
    model = keras.Sequential([keras.Input((2,)), L.Dense(1)])
    with pytest.raises(ValueError, match=argument):
        lipschitz.empirical_lower_bound(model, np.zeros((1, 2), np.float32), **{argument: value})


def _linear_matrix(model, input_shape):
    """The Jacobian of an affine model: f(e_j) - f(0), column by column."""
    zero = model(np.zeros((1,) + tuple(input_shape), np.float64)).numpy().reshape(-1)
    return reference.function_matrix(
        lambda x: model(x).numpy().reshape(len(x), -1) - zero, input_shape)


def test_linear_model_bound_is_at_least_its_exact_norm(rng):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 2), dtype="float64")
    x = L.Conv2D(3, 3, strides=2, padding="same", dtype="float64")(inputs)
    x = L.BatchNormalization(dtype="float64")(x)
    x = L.Conv2D(4, 3, padding="valid", dtype="float64")(x)
    x = L.Flatten(dtype="float64")(x)
    model = keras.Model(inputs, L.Dense(5, dtype="float64")(x))
    _randomise_batch_norms(model, rng)
    exact = np.linalg.norm(_linear_matrix(model, (6, 6, 2)), 2)
    result = lipschitz.lipschitz_bound(model)
    assert exact <= float(result)
    # Folding the BN into the first conv: its record says so and the BN adds nothing.
    by_class = {f.class_name: f for f in result.layers}
    assert "folded" in by_class["BatchNormalization"].reason
    assert by_class["BatchNormalization"].factor == 1.0
    # One record per layer call, in the order of the graph.
    assert [f.name for f in result.layers] == [
        layer.name for layer in model.layers if not isinstance(layer, L.InputLayer)]


def test_single_layer_model_is_its_certified_layer_bound():
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((7, 7, 2)),
                              L.Conv2D(3, 3, strides=2, padding="same")])
    (op,) = tfconvnorm.model_geometry(model)
    kernel = op.to_spectral(tf.cast(op.variable.value, tf.float64))
    _, upper = tfconvnorm.conv_operator_norm_bounds(kernel, **op.geometry.spectral_kwargs())
    result = lipschitz.lipschitz_bound(model)
    assert float(result) == pytest.approx(float(upper), rel=1e-12)
    true = np.linalg.norm(_linear_matrix(model, (7, 7, 2)), 2)
    assert true <= float(result)


def test_folding_batch_norm_is_tighter_and_still_holds(rng):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6, 6, 2), dtype="float64")
    conv = L.Conv2D(3, 3, padding="same", dtype="float64")
    x = L.BatchNormalization(dtype="float64")(conv(inputs))
    folded = keras.Model(inputs, x)
    _randomise_batch_norms(folded, rng)
    # The same layers, but the conv's output also leaves the model: no folding.
    unfolded = keras.Model(inputs, [x, conv.output])
    exact = np.linalg.norm(_linear_matrix(folded, (6, 6, 2)), 2)
    tight = float(lipschitz.lipschitz_bound(folded))
    loose = lipschitz.lipschitz_bound(unfolded)
    assert exact <= tight
    bn = [f for f in loose.layers if f.class_name == "BatchNormalization"][0]
    assert "moving_variance" in bn.reason and bn.factor > 1
    # Without folding, BN's factor multiplies the conv's (and the two outputs add
    # in squares): strictly looser here.
    assert tight < [f for f in loose.layers if f.class_name == "BatchNormalization"][0].bound


# sup |f'| of Keras' own activation functions on a fine grid, against the constants.
_GRID = np.linspace(-12.0, 12.0, 480001)


# Far points where a slope only tends to its sup (squareplus, softplus).
_FAR = np.array([-1000.0, -999.999, 999.999, 1000.0])


@pytest.mark.parametrize("name", sorted(n for n in lipschitz.ACTIVATION_CONSTANTS
                                        if n not in ("softmax", "sparsemax")))
def test_activation_constants_are_the_sup_of_the_slope(name):
    """Elementwise activations: no slope of Keras' own function exceeds the
    constant, and some come within 0.1% of it (the constant is not loose)."""
    function = keras.activations.get(name)
    values = np.asarray(function(tf.constant(_GRID, tf.float64)))
    slopes = np.abs(np.diff(values) / np.diff(_GRID))
    far = np.asarray(function(tf.constant(_FAR, tf.float64)))
    far_slopes = np.abs(np.diff(far)[[0, 2]] / np.diff(_FAR)[[0, 2]])
    constant = lipschitz.ACTIVATION_CONSTANTS[name]
    assert max(slopes.max(), far_slopes.max()) <= constant * (1 + 1e-6), name
    assert max(slopes.max(), far_slopes.max()) >= constant * (1 - 1e-3), name


def test_sparsemax_is_nonexpansive(rng):
    for _ in range(20):
        x, y = rng.normal(size=(2, 7)) * rng.uniform(0.1, 5)
        fx, fy = (np.asarray(keras.activations.sparsemax(tf.constant(v[None])))[0]
                  for v in (x, y))
        assert np.linalg.norm(fx - fy) <= np.linalg.norm(x - y) * (1 + 1e-6)


def test_softmax_constant_is_the_sup_of_its_jacobian_norm(rng):
    worst = 0.0
    for logits in [np.array([0.0, 0.0])] + [rng.normal(size=k) * s
                                            for k in (2, 3, 10) for s in (0.1, 1, 5)]:
        p = np.exp(logits - logits.max())
        p /= p.sum()
        worst = max(worst, np.linalg.norm(np.diag(p) - np.outer(p, p), 2))
    assert worst <= lipschitz.ACTIVATION_CONSTANTS["softmax"] + 1e-12
    assert worst == pytest.approx(0.5)  # two classes at p = 1/2


@pytest.mark.parametrize("make,shape", [
    (lambda **k: L.AveragePooling2D(2, **k), (6, 6, 1)),
    (lambda **k: L.AveragePooling2D(3, strides=2, padding="same", **k), (7, 6, 1)),
    (lambda **k: L.AveragePooling1D(3, strides=1, padding="same", **k), (5, 1)),
    (lambda **k: L.GlobalAveragePooling2D(**k), (3, 4, 1)),
])
def test_average_pooling_factor_is_the_layers_exact_norm(make, shape):
    """TensorFlow leaves 'same' pads out of each average: not a zero-padded conv."""
    layer = make(dtype="float64")
    model = keras.Sequential([keras.Input(shape, dtype="float64"), layer])
    exact = np.linalg.norm(_linear_matrix(model, shape), 2)
    assert float(lipschitz.lipschitz_bound(model)) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("make,shape,shared", [
    (lambda: L.MaxPooling2D(2), (6, 6, 2), 1),
    (lambda: L.MaxPooling2D(3, strides=2, padding="same"), (7, 7, 2), 4),
    (lambda: L.MaxPooling1D(3, strides=1, padding="valid"), (6, 2), 3),
])
def test_max_pooling_factor(make, shape, shared, rng):
    model = keras.Sequential([keras.Input(shape), make()])
    result = lipschitz.lipschitz_bound(model)
    assert float(result) == pytest.approx(np.sqrt(shared))
    x = rng.standard_normal((8,) + shape).astype(np.float32)
    assert lipschitz.empirical_lower_bound(model, x) <= float(result) * (1 + 1e-6)


def test_nested_models_and_several_inputs_and_outputs():
    keras.utils.set_random_seed(6)
    inner_in = keras.Input((8, 8, 2))
    inner = keras.Model(inner_in, L.Conv2D(2, 3, padding="same", name="inner_conv")(inner_in),
                        name="block")
    a, b = keras.Input((8, 8, 2)), keras.Input((8, 8, 2))
    out = L.Add()([inner(a), b])
    model = keras.Model([a, b], [out, L.ReLU()(out)])
    result = lipschitz.lipschitz_bound(model)
    (op,) = tfconvnorm.model_geometry(model)
    conv = float(tfconvnorm.conv_operator_norm_bounds(
        op.to_spectral(tf.cast(op.variable.value, tf.float64)),
        **op.geometry.spectral_kwargs()).upper)
    # Each input is a 1-Lipschitz function of the concatenated input; two outputs
    # add in squares.
    assert float(result) == pytest.approx(np.sqrt(2) * (conv + 1), rel=1e-12)
    assert any(f.name == "block/inner_conv" for f in result.layers)


def test_unsupported_layers_are_named_and_layer_bounds_supply_them():
    inputs = keras.Input((4, 4, 2))
    x = L.Conv2D(2, 1, name="c")(inputs)
    gate = L.Activation("sigmoid", name="gate")(L.GlobalAveragePooling2D(keepdims=True)(x))
    model = keras.Model(inputs, L.Multiply(name="excite")([x, gate]))
    with pytest.raises(ValueError, match=r"'excite' \(Multiply\).*product.*layer_bounds"):
        lipschitz.lipschitz_bound(model)
    assert np.isfinite(float(lipschitz.lipschitz_bound(model, layer_bounds={"excite": 2.0})))
    with pytest.raises(ValueError, match=r"not in model.*\['nope'\]"):
        lipschitz.lipschitz_bound(model, layer_bounds={"nope": 1.0})
    with pytest.raises(ValueError, match=r"layer_bounds\['excite'\].*-1"):
        lipschitz.lipschitz_bound(model, layer_bounds={"excite": -1})
    norm = keras.Sequential([keras.Input((3, 4)), L.LayerNormalization(name="ln")])
    with pytest.raises(ValueError, match=r"'ln' \(LayerNormalization\)"):
        lipschitz.lipschitz_bound(norm)
    exp = keras.Sequential([keras.Input((3,)), L.Dense(2, activation="exponential", name="e")])
    with pytest.raises(ValueError, match="'exponential'"):
        lipschitz.lipschitz_bound(exp)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed"):
        lipschitz.lipschitz_bound(Sub())


def test_applications_bounds_and_the_clear_error():
    keras.utils.set_random_seed(7)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3))
    result = lipschitz.lipschitz_bound(model)
    assert np.isfinite(float(result)) and float(result) > 0
    top = result.top_contributors(3)
    assert len(top) == 3 and top[0].factor >= top[-1].factor
    assert "certified" in result.summary()
    efficient = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match=r"block1a_se_excite.*Multiply.*layer_bounds"):
        lipschitz.lipschitz_bound(efficient)
    gates = {l.name: 1.0 for l in efficient.layers if isinstance(l, L.Multiply)}
    assert np.isfinite(float(lipschitz.lipschitz_bound(efficient, layer_bounds=gates)))


@pytest.mark.slow
def test_resnet50v2_bound_is_finite_with_top_contributors():
    keras.utils.set_random_seed(8)
    model = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3))
    result = lipschitz.lipschitz_bound(model)
    assert np.isfinite(float(result))
    assert all(f.factor > 1 for f in result.top_contributors(5))
