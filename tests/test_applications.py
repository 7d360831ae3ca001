"""keras.applications models work with no flags, and their bounds hold.

Before zero padding was handled, `model_geometry` refused MobileNetV2/V3,
EfficientNet, Xception, InceptionV3 and NASNetMobile (strides that do not
divide odd feature-map sizes). Now every layer is taken with its own padding.
The oracle for the layers checked (the smallest of those whose geometry used
to be refused: a stride that does not divide the input size) is the Keras
layer itself applied to every basis vector (`reference.function_matrix`), or,
where that matrix is too large, power iteration on the Keras layer, whose
estimate no upper bound may be below.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from tfconvnorm import reference

A = keras.applications
# (constructor, input size): the smallest sizes keras.applications accepts.
ZOO = [
    (A.ResNet50V2, 32), (A.ResNet50, 32), (A.MobileNetV2, 32), (A.MobileNetV3Small, 32),
    (A.EfficientNetB0, 32), (A.EfficientNetV2B0, 32), (A.Xception, 71), (A.InceptionV3, 75),
    (A.DenseNet121, 32), (A.NASNetMobile, 32), (A.ConvNeXtTiny, 32), (A.VGG16, 32),
]
# Matrices up to this many entries are built for the check.
MATRIX_LIMIT = 3_000_000


def _odd_strided(operators):
    """The operators a circular geometry could not describe: a stride that does
    not divide the input size."""
    return [op for op in operators
            if any(n % s for n, s in zip(op.geometry.layer_input_shape, op.geometry.strides))]


def _twin(op):
    """A float64, bias-free copy of the Keras layer (for a separable layer, of its
    depthwise part), built on the operator's input, and that input's shape."""
    layer = op.layer
    size = op.geometry.layer_input_shape
    c_in = op.variable.shape[-2] if op.geometry.kind != "conv_transpose" else None
    if isinstance(layer, (keras.layers.SeparableConv2D, keras.layers.SeparableConv1D)):
        config = {k: layer.get_config()[k] for k in ("kernel_size", "strides", "padding",
                                                     "dilation_rate", "depth_multiplier")}
        twin = keras.layers.DepthwiseConv2D(use_bias=False, dtype="float64", **config)
    else:
        config = dict(layer.get_config(), use_bias=False, dtype="float64", activation=None)
        config.pop("name")
        twin = type(layer).from_config(config)
    shape = tuple(size) + (c_in,)
    twin.build((None,) + shape)
    twin.set_weights([op.variable.numpy().astype(np.float64)])
    return twin, shape


def _true_norm(op):
    """The real layer's norm from the Keras layer's own matrix; None when too big."""
    twin, shape = _twin(op)
    if np.prod(shape) * np.prod(twin.compute_output_shape((None,) + shape)[1:]) > MATRIX_LIMIT:
        return None
    matrix = reference.function_matrix(lambda x: twin(tf.constant(x)).numpy(), shape)
    return float(np.linalg.norm(matrix, 2))


def _power_estimate(op, iterations=60):
    """||layer(v)|| / ||v|| after power iteration on the Keras layer itself: at
    most its norm, so at most any upper bound."""
    twin, shape = _twin(op)
    v = tf.random.stateless_normal((1,) + shape, seed=[1, 2], dtype=tf.float64)
    for _ in range(iterations):
        with tf.GradientTape() as tape:
            tape.watch(v)
            energy = 0.5 * tf.reduce_sum(tf.square(twin(v)))
        g = tape.gradient(energy, v)
        v = g / tf.norm(g)
    return float(tf.norm(twin(v)))


@pytest.mark.slow
@pytest.mark.parametrize("build,size", ZOO, ids=[b.__name__ for b, _ in ZOO])
def test_applications_work_without_flags_and_bounds_hold(build, size):
    keras.utils.set_random_seed(0)
    model = build(weights=None, input_shape=(size, size, 3), classes=10)
    operators = tfconvnorm.model_geometry(model)
    assert operators and all(op.geometry.is_certified for op in operators)
    attached = tfconvnorm.constrain(model, 1.0)
    assert set(attached) == {op.name for op in operators}
    odd = _odd_strided(operators)
    # The three smallest: the true norm from the layer's own matrix where it
    # fits, else a power-iteration estimate on the layer (at most its norm).
    for op in sorted(odd, key=lambda op: op.variable.numpy().size)[:3]:
        kernel = op.to_spectral(op.variable.value)
        lower, upper = tfconvnorm.conv_operator_norm_bounds(
            kernel, **op.geometry.spectral_kwargs(), iterations=16)
        true = _true_norm(op)
        if true is None:
            assert _power_estimate(op) <= float(upper) * (1 + 1e-9), op.name
        else:
            assert float(lower) <= true <= float(upper), op.name
    if build in (A.MobileNetV2, A.MobileNetV3Small, A.EfficientNetB0, A.Xception,
                 A.InceptionV3, A.NASNetMobile):
        assert odd, "expected strides that do not divide odd sizes"


@pytest.mark.slow
def test_callbacks_and_analysis_on_an_odd_sized_application(tmp_path):
    """MobileNetV3Small at 32: stride-2 depthwise convs on 5x5 and 3x3 maps."""
    from tfconvnorm import analysis as analyze  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(1)
    model = A.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), include_top=False)
    odd = [op.layer.name for op in _odd_strided(tfconvnorm.model_geometry(model))]
    clipper = tfconvnorm.OperatorNormClipper(0.5, method="alternating", layers=odd)
    clipper.set_model(model)
    for op, (_, after) in zip(clipper.operators, clipper.project_now().values()):
        assert after <= 0.5 * (1 + 1e-4)
        true = _true_norm(op)
        assert true is None or true <= 0.5 * (1 + 1e-4), op.name
    logger = tfconvnorm.SpectrumLogger(str(tmp_path / "logs"), layers=odd, log_image=False,
                                       bound_iterations=8)
    logger.set_model(model)
    logger.log_now(step=0)
    assert all(lo <= up for lo, up in logger.last_bounds.values())
    path = str(tmp_path / "mobilenet.keras")
    model.save(path)
    result = analyze.analyse(path, str(tmp_path / "out"), verbose=False, bound_iterations=4)
    assert len(result["spectra"]) == len(tfconvnorm.model_geometry(model))
    assert not any(s.geometry.approximate for s in result["spectra"])
    assert sorted(os.listdir(tmp_path / "out")) == ["spectra.npz", "spectra.png", "summary.csv"]
