"""Every bound holds for the Keras layer the user has: its own matrix as the oracle.

For a grid of real layers (every kind `model_geometry` knows; 'same', 'valid',
'causal'; strides on sizes they do not divide; dilation; groups; transposed
layers with output_padding), the oracle is the layer itself applied to every
basis vector, in float64 (`reference.function_matrix`); a separable layer's
two parts are the depthwise and 1x1 layers it is made of. On every case:

* the spectrum `model_geometry` + `conv_singular_values` give has exactly the
  layer's number of singular values and bounds each from above;
* `conv_operator_norm_bounds`: lower <= true norm <= upper, as computed;
* after `constrain(model, c, apply_now=True)`, the layer's true norm <= c (1 + 1e-4),
  and the attached constraints do the same inside `fit`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import oracles
import tfconvnorm
from tfconvnorm import reference

L = keras.layers
# (layer factory, input shape without batch); every layer without bias.
LAYERS = [
    (lambda: L.Conv1D(3, 3, strides=2, padding="same"), (7, 2)),
    (lambda: L.Conv1D(2, 3, dilation_rate=2, padding="causal"), (9, 2)),
    (lambda: L.Conv1D(3, 4, strides=3, padding="valid"), (11, 2)),
    (lambda: L.Conv2D(3, 3, strides=2, padding="same"), (7, 6, 2)),
    (lambda: L.Conv2D(3, 3, strides=3, padding="valid"), (8, 7, 2)),
    (lambda: L.Conv2D(2, 4, strides=2, padding="same"), (7, 7, 2)),
    (lambda: L.Conv2D(3, 3, dilation_rate=2, padding="same"), (6, 6, 2)),
    (lambda: L.Conv2D(4, (3, 2), strides=(2, 1), padding="same", groups=2), (5, 6, 2)),
    (lambda: L.Conv3D(2, 3, strides=2, padding="same"), (5, 4, 3, 2)),
    (lambda: L.Conv3D(2, 2, padding="valid"), (4, 3, 4, 2)),
    (lambda: L.DepthwiseConv1D(3, strides=2, padding="same", depth_multiplier=2), (9, 2)),
    (lambda: L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2), (7, 7, 2)),
    (lambda: L.DepthwiseConv2D(5, padding="valid"), (8, 7, 3)),
    (lambda: L.DepthwiseConv2D(3, dilation_rate=2, padding="same"), (6, 5, 2)),
    (lambda: L.SeparableConv1D(3, 3, strides=2, padding="same"), (9, 2)),
    (lambda: L.SeparableConv2D(3, 3, strides=2, padding="same", depth_multiplier=2), (7, 6, 2)),
    (lambda: L.SeparableConv2D(2, 3, padding="valid"), (6, 6, 2)),
    (lambda: L.Conv1DTranspose(2, 3, strides=2, padding="same", output_padding=0), (5, 3)),
    (lambda: L.Conv2DTranspose(2, 3, strides=2, padding="valid"), (3, 3, 2)),
    (lambda: L.Conv2DTranspose(2, 3, strides=2, padding="same"), (3, 4, 2)),
    (lambda: L.Conv2DTranspose(2, 3, strides=2, padding="same", output_padding=0), (4, 3, 2)),
    (lambda: L.Conv2DTranspose(3, 4, strides=3, padding="valid", output_padding=1), (3, 3, 2)),
    (lambda: L.Conv3DTranspose(2, 2, strides=2, padding="valid"), (2, 3, 2, 2)),
    (lambda: L.Dense(4), (5,)),
]


def _ids():
    return [f"{type(make()).__name__}-{i}" for i, (make, _) in enumerate(LAYERS)]


def _model(make, input_shape, seed):
    keras.utils.set_random_seed(seed)
    layer = make()
    layer.use_bias = False
    model = keras.Sequential([keras.Input(input_shape), layer])
    return model, layer


@pytest.mark.parametrize("make,input_shape", LAYERS, ids=_ids())
def test_bounds_hold_for_the_real_layer(make, input_shape, monkeypatch):
    model, layer = _model(make, input_shape, seed=0)
    parts = oracles.keras_part_matrices(layer, input_shape)
    operators = tfconvnorm.model_geometry(model)
    assert sorted(op.variable.name for op in operators) == sorted(parts)
    true_norms = {}
    for op in operators:
        matrix, c_out, c_in, groups = parts[op.variable.name]
        expected = reference.grouped_singular_values(matrix, c_out, c_in, groups)
        kernel = op.to_spectral(tf.cast(op.variable.value, tf.float64))
        kwargs = op.geometry.spectral_kwargs()
        got = tfconvnorm.conv_singular_values(kernel, **kwargs).numpy()
        assert got.shape == expected.shape, op.name
        assert np.all(expected <= got * (1 + 1e-9) + 1e-12), op.name
        true = np.linalg.norm(matrix, 2)
        # Both routes to the interval: explicit matrices (these layers are small)
        # and, with that route off, Lanczos on the layer.
        for explicit_limit in (tfconvnorm.spectral.bounds.EXPLICIT_MAX_COLUMNS, 0):
            monkeypatch.setattr(tfconvnorm.spectral.bounds, "EXPLICIT_MAX_COLUMNS",
                                explicit_limit)
            lower, upper = tfconvnorm.conv_operator_norm_bounds(kernel, **kwargs)
            assert float(lower) <= true <= float(upper), op.name
            assert float(lower) >= 0.99 * true, op.name  # the benchmark reports tightness
        true_norms[op.variable.name] = true
    bound = 0.5 * min(true_norms.values())
    tfconvnorm.constrain(model, bound, apply_now=True)
    for name, (matrix, *_) in oracles.keras_part_matrices(layer, input_shape).items():
        assert np.linalg.norm(matrix, 2) <= bound * (1 + 1e-4), name


def test_constraints_hold_the_real_norms_during_fit():
    """The attached constraints, applied by the optimizer after every step."""
    model = keras.Sequential([
        keras.Input((7, 7, 2)),
        L.Conv2D(4, 3, strides=2, padding="same", use_bias=False,
                 kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)),
        L.DepthwiseConv2D(3, padding="same", use_bias=False,
                          depthwise_initializer=keras.initializers.RandomNormal(stddev=2.0)),
        L.Conv2DTranspose(2, 3, strides=2, padding="valid", use_bias=False),
    ])
    tfconvnorm.constrain(model, 0.8)
    model.compile(keras.optimizers.SGD(0.5), "mse", jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 7, 7, 2)).astype(np.float32)
    y = 10 * rng.standard_normal((8,) + model.output_shape[1:]).astype(np.float32)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    shapes = [(7, 7, 2), (4, 4, 4), (4, 4, 4)]
    for layer, shape in zip(model.layers, shapes):
        (matrix, *_), = oracles.keras_part_matrices(layer, shape).values()
        assert np.linalg.norm(matrix, 2) <= 0.8 * (1 + 1e-4), layer.name


def test_transposed_example_from_the_issue():
    """Conv2DTranspose(2, 3, strides=2, 'valid') on 3x3: the circular geometry of
    old (input size times strides, 6x6) gave less than the layer's norm."""
    model, layer = _model(lambda: L.Conv2DTranspose(2, 3, strides=2, padding="valid"),
                          (3, 3, 2), seed=3)
    (matrix, *_), = oracles.keras_part_matrices(layer, (3, 3, 2)).values()
    (op,) = tfconvnorm.model_geometry(model)
    assert op.geometry.input_shape == (7, 7)  # the layer's output: (3 - 1) * 2 + 3
    kernel = op.to_spectral(tf.cast(op.variable.value, tf.float64))
    upper = float(tfconvnorm.conv_operator_norm(kernel, **op.geometry.spectral_kwargs()))
    assert np.linalg.norm(matrix, 2) <= upper * (1 + 1e-9)
