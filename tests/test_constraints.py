"""Tests for tfconvnorm.constraints: the constraint, the regularizer and constrain().

The oracle for norms is the explicit matrix of the layer as the model
computes it (`reference.explicit_padded_operator_matrix` of the kernel, with
the layer's hand-checked geometry; a transposed layer's is the transpose of
its forward conv's), never the library's own spectral functions; the
geometry is checked against hand-written expectations.
"""

import json
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from tfconvnorm import geometry
from tfconvnorm.callbacks import optimizer_step
from tfconvnorm import reference
from tfconvnorm.constraints import (OperatorNormConstraint, OperatorNormRegularizer,
                                    constrain)

TOLERANCE = 1 + 1e-4


def _matrix(op):
    """Explicit matrix of a LayerOperator's layer part with its current kernel."""
    kernel = np.asarray(op.to_spectral(tf.cast(op.variable.value, tf.float64)))
    g = op.geometry
    if g.kind == "dense":
        return kernel.T
    padding = g.padding if g.padding != "circular" else g.layer_padding
    if g.kind == "conv_transpose":  # the adjoint of the strided conv of its output size
        return reference.explicit_padded_operator_matrix(kernel, g.input_shape, g.strides,
                                                         g.dilation_rate, 1, padding).T
    return reference.explicit_padded_operator_matrix(kernel, g.input_shape, g.strides,
                                                     g.dilation_rate, g.groups, padding)


def _norm(op):
    """The true operator norm of a LayerOperator's layer part (explicit matrix)."""
    return float(np.linalg.norm(_matrix(op), 2))


def _data(rng, input_shape, outputs, n=16, scale=1.0):
    x = rng.standard_normal((n,) + tuple(input_shape)).astype(np.float32)
    y = scale * rng.standard_normal((n, outputs)).astype(np.float32)
    return x, y


def _mixed_model():
    """Conv1D branch and a 2-D branch with every operator kind, merged at the end."""
    seq_in = keras.Input((16, 3))
    s = keras.layers.Conv1D(4, 3, padding="causal", name="conv1d")(seq_in)
    s = keras.layers.GlobalAveragePooling1D()(s)
    img_in = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="strided")(img_in)
    x = keras.layers.Conv2D(8, 3, dilation_rate=2, padding="same", name="dilated")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="depthwise")(x)
    x = keras.layers.SeparableConv2D(8, 3, strides=2, padding="same", name="separable")(x)
    x = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="transposed")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Concatenate()([s, x])
    outputs = keras.layers.Dense(3, name="dense")(x)
    return keras.Model([seq_in, img_in], outputs)


def test_numpy_int_arguments_become_python_ints_in_the_config():
    # Sizes read from arrays (np.int64) are accepted; the config must still be JSON.
    constraint = OperatorNormConstraint(0.5, input_shape=np.int64(8), strides=(np.int64(2), 1),
                                        groups=np.int64(2), padding="same")
    config = constraint.get_config()
    assert (config["input_shape"], config["strides"], config["groups"]) == (8, (2, 1), 2)
    assert all(type(v) is int for v in (config["input_shape"], config["groups"],
                                          *config["strides"]))
    json.dumps(config)


def test_constraint_config_is_exactly_the_constructor_arguments():
    constraint = OperatorNormConstraint(0.5, input_shape=(8, 6), strides=2, dilation_rate=(1, 2),
                                        groups=2, method="exact", iterations=7, padding="same")
    config = constraint.get_config()
    assert config == dict(max_norm=0.5, input_shape=(8, 6), strides=2, dilation_rate=(1, 2),
                          groups=2, method="exact", iterations=7, layout="conv",
                          padding="same")
    assert OperatorNormConstraint(**config).get_config() == config
    # JSON turns tuples into lists; the config stays the same after from_config.
    restored = keras.constraints.deserialize(keras.constraints.serialize(constraint))
    assert isinstance(restored, OperatorNormConstraint) and restored.get_config() == config
    regularizer = OperatorNormRegularizer(0.01, input_shape=5, threshold=1.5, layout="depthwise")
    config = regularizer.get_config()
    assert config == dict(weight=0.01, input_shape=5, strides=1, dilation_rate=1, groups=1,
                          threshold=1.5, layout="depthwise", padding="circular")
    restored = keras.regularizers.deserialize(keras.regularizers.serialize(regularizer))
    assert isinstance(restored, OperatorNormRegularizer) and restored.get_config() == config
    # Explicit pads and a transposed layer's output_padding survive JSON too.
    transposed = OperatorNormConstraint(1.0, input_shape=(4, 4), strides=2, layout="conv_transpose",
                                        padding="same", output_padding=(1, 0))
    restored = keras.constraints.deserialize(keras.constraints.serialize(transposed))
    assert restored.get_config() == transposed.get_config()
    assert transposed.get_config()["output_padding"] == (1, 0)
    explicit = OperatorNormConstraint(1.0, input_shape=(6, 6), padding=((1, 2), (0, 1)))
    restored = keras.constraints.deserialize(keras.constraints.serialize(explicit))
    assert restored.get_config() == explicit.get_config()
    assert restored.padding == ((1, 2), (0, 1))


def test_configs_saved_before_padding_existed_still_load():
    old = dict(max_norm=0.5, input_shape=8, strides=1, dilation_rate=1, groups=1,
               method="alternating", iterations=None, layout="conv")
    assert OperatorNormConstraint.from_config(old).padding == "circular"


@pytest.mark.parametrize("max_norm", [0, -1.0, float("nan"), float("inf"), "1", None])
def test_bad_max_norm_is_named(max_norm):
    with pytest.raises(ValueError, match=r"max_norm.*received max_norm="):
        OperatorNormConstraint(max_norm, input_shape=8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="svd"), r"method=.svd."),
    (dict(layout="nhwc"), r"layout=.nhwc."),
    (dict(input_shape=(8, 0)), r"input_shape=\(8, 0\)"),
    (dict(strides=0), r"strides=0"),
    (dict(groups=0), r"groups=0"),
    (dict(layout="depthwise", groups=4), r"groups=4"),
    (dict(iterations=0), r"iterations=0"),
    (dict(padding="full"), r"padding='full'"),
    (dict(padding=((1, -1),)), r"padding=\(\(1, -1\),\)"),
    (dict(output_padding=1), r"output_padding=1 with layout='conv'"),
    (dict(layout="conv_transpose", output_padding=-1), r"output_padding=-1"),
])
def test_bad_constraint_arguments_are_named(kwargs, match):
    args = dict(max_norm=1.0, input_shape=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        OperatorNormConstraint(**args)


def test_bad_regularizer_arguments_are_named():
    with pytest.raises(ValueError, match=r"weight=-1"):
        OperatorNormRegularizer(-1, input_shape=8)
    with pytest.raises(ValueError, match=r"threshold=nan"):
        OperatorNormRegularizer(1.0, input_shape=8, threshold=float("nan"))


def _layout_matrix(kernel, layout, input_shape, strides, padding):
    """Explicit matrix of a layer with this kernel (its own layout)."""
    kernel = np.asarray(kernel, np.float64)
    if not input_shape:
        return kernel.T
    if layout == "depthwise":
        c_in = kernel.shape[-2]
        conv = kernel.reshape(kernel.shape[:-2] + (1, -1))
        return reference.explicit_padded_operator_matrix(conv, input_shape, strides, 1, c_in,
                                                         padding)
    if layout == "conv_transpose":  # forward conv of the 'same' output size n * s
        size = tuple(n * strides for n in input_shape)
        return reference.explicit_padded_operator_matrix(kernel, size, strides, 1, 1, padding).T
    return reference.explicit_padded_operator_matrix(kernel, input_shape, strides, 1, 1, padding)


@pytest.mark.parametrize("layout, shape, input_shape, strides, padding, core_kwargs", [
    ("conv", (3, 3, 4, 6), (7, 8), 2, "same", dict(input_shape=(7, 8), strides=2)),
    ("conv", (3, 3, 4, 6), (8, 8), 3, "valid", dict(input_shape=(8, 8), strides=3)),
    ("conv", (5, 3), (), 1, "same", dict(input_shape=())),
    ("depthwise", (3, 3, 4, 2), (6, 6), 1, "same", dict(input_shape=(6, 6), groups=4)),
    ("conv_transpose", (3, 3, 2, 4), (4, 4), 2, "same", dict(input_shape=(8, 8), strides=2)),
])
def test_constraint_bounds_the_real_layer_in_its_layout(layout, shape, input_shape, strides,
                                                        padding, core_kwargs, rng):
    kernel = 3 * rng.standard_normal(shape).astype(np.float32)
    constraint = OperatorNormConstraint(0.5, input_shape=input_shape, strides=strides,
                                        layout=layout, padding=padding)
    got = constraint(tf.constant(kernel))
    assert got.shape == kernel.shape and got.dtype == tf.float32
    true = np.linalg.norm(_layout_matrix(got, layout, input_shape, strides, padding), 2)
    assert true <= 0.5 * TOLERANCE
    # Plumbing: the kernel divided by the matmul path's certified bound of the
    # kernel in the conv layout (the eigh path is its reference: a bound at
    # least the exact norm, within 1%).
    conv = kernel
    if layout == "depthwise":
        conv = kernel.reshape(shape[:-2] + (1, shape[-2] * shape[-1]))
    bound = float(tfconvnorm.conv_operator_norm_upper_bound(conv, padding=padding,
                                                            **core_kwargs))
    np.testing.assert_allclose(np.reshape(got, conv.shape), conv * 0.5 / bound, rtol=1e-5,
                               atol=1e-7)
    # The default rescales: the same kernel up to one factor, landing on the
    # bound up to the bound's slack (at most 1%).
    factor = np.asarray(got).reshape(-1) / kernel.reshape(-1)
    np.testing.assert_allclose(factor, factor[0], rtol=1e-5)
    assert 0.5 / 1.01 <= float(constraint.operator_norm(got)) <= 0.5 * (1 + 1e-6)
    assert float(constraint.norm_upper_bound(got)) <= 0.5
    # operator_norm is the bound it enforces: at least the layer's norm.
    assert true <= float(constraint.operator_norm(got)) * (1 + 1e-5)


def test_constraint_dtypes_and_graph_mode(rng):
    kernel = rng.standard_normal((3, 3, 2, 2))
    constraint = OperatorNormConstraint(0.3, input_shape=6)  # the circular operator on 6
    for dtype in (tf.float64, tf.float16):
        got = constraint(tf.constant(kernel, dtype))
        assert got.dtype == dtype
        circular = reference.explicit_operator_matrix(tf.cast(got, tf.float64).numpy(), (6, 6))
        # float16 rounds the result itself by up to 2^-11 per entry.
        assert np.linalg.norm(circular, 2) <= 0.3 * (TOLERANCE if dtype == tf.float64 else 1.01)
    variable = keras.Variable(kernel.astype(np.float32))
    graph_result = tf.function(constraint)(variable)
    np.testing.assert_allclose(graph_result, constraint(variable), rtol=1e-6)


def test_non_finite_kernel_raises_instead_of_being_clipped():
    constraint = OperatorNormConstraint(1.0, input_shape=4)
    kernel = np.ones((3, 3, 2, 2), np.float32)
    kernel[1, 1, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError):
        constraint(tf.constant(kernel))
    kernel[1, 1, 0, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.function(constraint)(tf.constant(kernel))


def test_small_cnn_with_kernel_constraint_keeps_norms_bounded_after_fit(rng):
    def constraint(size, strides=1):  # by hand, as README shows: with the layer's padding
        return OperatorNormConstraint(1.0, input_shape=size, strides=strides, padding="same")

    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, padding="same", kernel_constraint=constraint(12),
                            kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", kernel_constraint=constraint(12, 2),
                            kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, kernel_constraint=constraint(())),
    ])
    operators = geometry.model_geometry(model)
    assert len(operators) == 3
    assert min(_norm(op) for op in operators[:2]) > 2.0  # the constraint has work to do
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(*_data(rng, (12, 12, 3), 2), batch_size=4, epochs=1, verbose=0)
    for op in operators:
        assert _norm(op) <= 1.0 * TOLERANCE, op.name


def test_constrain_mixed_model_attaches_right_geometry_and_norms_hold_after_fit(rng):
    model = _mixed_model()
    attached = constrain(model, 0.5)
    expected = {
        "conv1d/kernel": dict(input_shape=(16,), strides=(1,), dilation_rate=(1,), groups=1,
                              layout="conv", padding="causal"),
        "strided/kernel": dict(input_shape=(16, 16), strides=(2, 2), dilation_rate=(1, 1),
                               groups=1, layout="conv", padding="same"),
        "dilated/kernel": dict(input_shape=(8, 8), strides=(1, 1), dilation_rate=(2, 2),
                               groups=1, layout="conv", padding="same"),
        "depthwise/kernel": dict(input_shape=(8, 8), strides=(1, 1), dilation_rate=(1, 1),
                                 groups=1, layout="depthwise", padding="same"),
        "separable/depthwise_kernel": dict(input_shape=(8, 8), strides=(2, 2),
                                           dilation_rate=(1, 1), groups=1, layout="depthwise",
                                           padding="same"),
        "separable/pointwise_kernel": dict(input_shape=(4, 4), strides=(1, 1),
                                           dilation_rate=(1, 1), groups=1, layout="conv",
                                           padding="valid"),
        "transposed/kernel": dict(input_shape=(4, 4), strides=(2, 2), dilation_rate=(1, 1),
                                  groups=1, layout="conv_transpose", padding="same",
                                  output_padding=None),
        "dense/kernel": dict(input_shape=(), strides=1, dilation_rate=1, groups=1, layout="conv",
                             padding="circular"),
    }
    assert set(attached) == set(expected)
    for name, args in expected.items():
        config = attached[name].get_config()
        assert {k: config.get(k) for k in args} == args, name
        assert config["max_norm"] == 0.5 and config["method"] == "rescale"
    operators = geometry.model_geometry(model)
    for op in operators:
        assert op.variable.constraint is attached[op.name]
        assert getattr(op.layer, op.constraint_attribute) is attached[op.name]
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=False)
    x_seq, y = _data(rng, (16, 3), 3, scale=10.0)
    x_img, _ = _data(rng, (16, 16, 3), 3)
    model.fit([x_seq, x_img], y, batch_size=8, epochs=1, verbose=0)
    for op in operators:
        assert _norm(op) <= 0.5 * TOLERANCE, op.name


def test_constrain_selected_layers_after_compile_resets_train_function(rng):
    model = keras.Sequential([keras.Input((8, 8, 2)),
                              keras.layers.Conv2D(4, 3, padding="same", name="a"),
                              keras.layers.Conv2D(4, 3, padding="same", name="b"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="fc")])
    model.compile(keras.optimizers.SGD(0.5), "mse", jit_compile=True)
    data = _data(rng, (8, 8, 2), 2, n=8, scale=100.0)
    model.fit(*data, epochs=1, verbose=0)  # traces a train function without constraints
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attached = constrain(model, 0.2, layers=["b"])
    # The default (rescale) runs on the matmul path, which XLA compiles.
    assert not any("XLA" in str(w.message) for w in caught) and model.jit_compile
    assert list(attached) == [op.name for op in geometry.model_geometry(model, layers=["b"])]
    model.fit(*data, epochs=1, verbose=0)
    ops = {op.layer.name: op for op in geometry.model_geometry(model)}
    assert _norm(ops["b"]) <= 0.2 * TOLERANCE
    assert _norm(ops["a"]) > 0.2 * TOLERANCE  # left alone
    assert ops["a"].variable.constraint is None
    # The projection methods run on the matmul path too: XLA stays on.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        constrain(model, 0.2, layers=["a"], method="alternating")
    assert not any("XLA" in str(w.message) for w in caught) and model.jit_compile


def test_constrain_errors_name_the_value():
    model = keras.Sequential([keras.Input((9, 9, 2)),
                              keras.layers.Conv2D(2, 3, strides=2, name="odd")])
    with pytest.raises(ValueError, match=r"max_norm=0"):
        constrain(model, 0)
    with pytest.raises(ValueError, match=r"'odd'.*\(2, 2\).*\(9, 9\)"):
        constrain(model, 1.0, boundary="circular")
    (op,) = geometry.model_geometry(model)  # its own 'valid' padding needs no rounding
    assert constrain(model, 1.0, apply_now=True) and _norm(op) <= TOLERANCE
    with pytest.raises(ValueError, match=r"`boundary` must be one of.*boundary='zero'"):
        constrain(model, 1.0, boundary="zero")
    with pytest.raises(ValueError, match=r"\['missing'\]"):
        constrain(model, 1.0, layers=["missing"], round_up=True)
    with pytest.raises(ValueError, match="not built"):
        constrain(keras.Sequential([keras.layers.Conv2D(2, 3)]), 1.0)
    taken = keras.Sequential([keras.Input((8, 8, 2)),
                              keras.layers.Conv2D(2, 3, name="taken",
                                                  kernel_constraint=keras.constraints.NonNeg())])
    with pytest.raises(ValueError, match="'taken' already has kernel_constraint"):
        constrain(taken, 1.0)


def test_keras_file_round_trip_keeps_constraints_and_regularizers(tmp_path):
    model = _mixed_model()
    constrain(model, 0.5, method="paper")
    dense = model.get_layer("dense")
    dense.kernel_regularizer = OperatorNormRegularizer(0.1, input_shape=(), threshold=0.25)
    strided = model.get_layer("strided")
    strided.kernel_regularizer = OperatorNormRegularizer(0.2, input_shape=16, strides=2)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    before = {op.name: op for op in geometry.model_geometry(model)}
    after = {op.name: op for op in geometry.model_geometry(loaded)}
    assert before.keys() == after.keys()
    for name, op in after.items():
        original = before[name].variable.constraint
        assert isinstance(op.variable.constraint, OperatorNormConstraint), name
        assert op.variable.constraint.get_config() == original.get_config(), name
        np.testing.assert_array_equal(op.variable.numpy(), before[name].variable.numpy())
    for name in ("dense", "strided"):
        restored = loaded.get_layer(name).kernel_regularizer
        assert isinstance(restored, OperatorNormRegularizer)
        assert restored.get_config() == model.get_layer(name).kernel_regularizer.get_config()


def test_regularizer_penalises_norm_above_threshold_and_is_differentiable(rng):
    kernel = tf.Variable(rng.standard_normal((3, 3, 2, 3)).astype(np.float32))

    def circular_norm(k):
        return np.linalg.norm(reference.explicit_operator_matrix(np.asarray(k), (6, 6), 2), 2)

    norm = circular_norm(kernel.numpy())
    regularizer = OperatorNormRegularizer(0.5, input_shape=6, strides=2, threshold=norm / 2)
    with tf.GradientTape() as tape:
        penalty = regularizer(kernel)
    # The penalty is on the certified upper bound: at least the norm, within 1%.
    assert 0.5 * (norm - norm / 2) <= float(penalty) <= 0.5 * (norm * 1.01 - norm / 2)
    gradient = tape.gradient(penalty, kernel)
    assert gradient is not None and float(tf.norm(gradient)) > 0
    # Gradient of 0.5 * sigma_max: a descent step lowers the norm.
    lowered = kernel - 0.01 * gradient
    assert circular_norm(lowered.numpy()) < norm
    below = OperatorNormRegularizer(0.5, input_shape=6, strides=2, threshold=norm * 2)
    assert float(below(kernel)) == 0.0


def test_regularizer_in_a_model_adds_its_loss():
    regularizer = OperatorNormRegularizer(0.1, input_shape=(8, 8), layout="depthwise",
                                          padding="same")
    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                         depthwise_regularizer=regularizer)
    model = keras.Sequential([keras.Input((8, 8, 2)), layer])
    (op,) = geometry.model_geometry(model)
    assert len(model.losses) == 1
    # The penalty is on the upper bound: the circular operator on N = 9 (pads 1, 1).
    kernel = op.to_spectral(op.variable.value).numpy().astype(np.float64)
    upper = np.linalg.norm(reference.explicit_operator_matrix(kernel, (9, 9), groups=2), 2)
    assert float(model.losses[0]) == pytest.approx(0.1 * upper, rel=1e-5)
    assert _norm(op) <= upper * (1 + 1e-6)


@pytest.mark.slow
def test_mixed_float16_training_keeps_float32_kernels_bounded(rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv",
                                kernel_initializer=keras.initializers.RandomNormal(stddev=1.0)),
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="fc", dtype="float32"),
        ])
        constrain(model, 0.7)
        model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=False)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        # The first steps overflow in float16 and are skipped by the loss scaling
        # (no update, so no constraint either): run enough steps for some to land.
        model.fit(*_data(rng, (8, 8, 3), 2, n=48), batch_size=4, epochs=1, verbose=0)
        assert optimizer_step(model) > 0  # the outer count stays 0 up to Keras 3.4
        for op in geometry.model_geometry(model):
            assert op.variable.dtype == "float32"
            assert np.all(np.isfinite(op.variable.numpy()))
            assert _norm(op) <= 0.7 * TOLERANCE, op.name
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_constrain_apply_now_projects_at_once_and_never_writes_nan():
    model = keras.Sequential([keras.Input((8, 8, 2)),
                              keras.layers.Conv2D(4, 3, padding="same", name="a"),
                              keras.layers.Dense(3, name="fc")])
    operators = geometry.model_geometry(model)
    assert max(_norm(op) for op in operators) > 0.1
    constrain(model, 0.1, apply_now=True)
    assert all(_norm(op) <= 0.1 * TOLERANCE for op in operators)
    fresh = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, name="a"),
                              keras.layers.Dense(3, name="fc")])
    conv, dense = geometry.model_geometry(fresh)
    dense.variable.assign(np.full(dense.variable.shape, np.inf, np.float32))
    original = conv.variable.numpy()
    with pytest.raises(tf.errors.InvalidArgumentError):
        constrain(fresh, 0.1, apply_now=True)
    np.testing.assert_array_equal(conv.variable.numpy(), original)
    assert conv.variable.constraint is None  # nothing attached either
