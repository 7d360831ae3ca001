"""The training-time path (`tfconvnorm.spectral.matmul`): a certified upper bound
from matmuls with static shapes, checked against the exact `eigh` path and the
explicit matrices, and the default constraint inside XLA-compiled `fit`."""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from tfconvnorm import constraints as constraints_lib, geometry, reference
from tfconvnorm.constraints import OperatorNormConstraint

import oracles

DATA = pathlib.Path(__file__).parent / "data"

# (kernel shape, input size, strides, dilation, groups, padding)
GRID = [
    ((3, 3, 16, 16), 32, 1, 1, 1, "same"),
    ((3, 3, 64, 64), 8, 1, 1, 1, "same"),
    ((3, 3, 16, 32), 32, 2, 1, 1, "same"),
    ((3, 3, 4, 8), 7, 2, 1, 1, "same"),     # strided 'same' on an odd size
    ((3, 3, 4, 6), 9, 1, 1, 1, "valid"),
    ((3, 3, 3, 4), 9, 1, 2, 1, "same"),     # dilated
    ((3, 3, 2, 6), 8, 1, 1, 3, "same"),     # grouped
    ((5, 5, 2, 2), 3, 1, 1, 1, "circular"),  # folded taps: input smaller than the kernel
    ((3, 4, 2), 7, 1, 1, 1, "causal"),
    ((3, 3, 3, 2, 3), 5, 1, 1, 1, "same"),
    ((1, 1, 16, 32), 8, 1, 1, 1, "same"),
    ((7, 5), (), 1, 1, 1, "circular"),       # Dense
    ((3, 3, 1, 8), 9, 2, 1, 1, "same"),      # one input channel: rows or columns
]
# Wide layers (MobileNetV2's 1x1 320 -> 1280, a 160-channel 3x3): their float32
# rounding allowances are the large ones (chunked Gram sums, row-sum squaring
# errors), so they are checked for soundness and tightness too.
WIDE = [
    ((1, 1, 320, 1280), 3, 1, 1, 1, "same"),
    ((3, 3, 160, 160), 4, 1, 1, 1, "same"),
]


# `make test` samples the grids (every XLA compilation costs seconds); the slow
# tier (`make test-slow`, CI) runs the rest of each grid.
_FAST = (0, 3, 6, 8, 11)


def _sampled(cases, fast):
    return [case if i in fast else pytest.param(*case, marks=pytest.mark.slow)
            for i, case in enumerate(cases)]


@pytest.mark.parametrize("shape,size,strides,dilation,groups,padding,dtype",
                         [case + (np.float32,) for case in GRID + WIDE]
                         + _sampled([case + (np.float64,) for case in GRID], _FAST)
                         + [case + (np.float64,) for case in WIDE])
def test_bound_is_never_below_the_exact_norm_and_is_tight(shape, size, strides, dilation,
                                                          groups, padding, dtype, rng):
    args = dict(input_shape=size, strides=strides, dilation_rate=dilation, groups=groups,
                padding=padding)
    # One XLA compilation for both kernels (same shape and dtype).
    compiled = tf.function(lambda k: tfconvnorm.conv_operator_norm_upper_bound(k, **args),
                           jit_compile=True)
    for kernel in (rng.standard_normal(shape),
                   # every frequency with the same top: the worst case for selection
                   np.ones(shape) + 1e-3 * rng.standard_normal(shape)):
        exact = float(tfconvnorm.conv_operator_norm(tf.constant(kernel), **args))
        bound = float(compiled(tf.constant(kernel.astype(dtype))))
        # As computed, in the user's dtype, against the float64 exact norm.
        assert exact <= bound <= exact * 1.01, (exact, bound)


def test_bound_against_the_explicit_matrix_of_a_padded_layer(rng):
    kernel = rng.standard_normal((3, 3, 3, 4))
    matrix = reference.explicit_padded_operator_matrix(kernel, (7, 7), (2, 2), (1, 1), 1, "same")
    bound = float(tfconvnorm.conv_operator_norm_upper_bound(
        tf.constant(kernel, tf.float32), 7, strides=2, padding="same"))
    assert bound >= np.linalg.norm(matrix, 2)


def test_bound_is_scale_free_and_zero_for_zero():
    zero = float(tfconvnorm.conv_operator_norm_upper_bound(tf.zeros((3, 3, 2, 2)), 6))
    assert 0.0 <= zero <= 1e-12
    kernel = np.random.default_rng(1).standard_normal((3, 3, 2, 2))
    for scale in (1e-30, 1e30):
        exact = float(tfconvnorm.conv_operator_norm(tf.constant(kernel * scale), 6))
        bound = float(tfconvnorm.conv_operator_norm_upper_bound(
            tf.constant(kernel * scale, tf.float32), 6))
        assert np.isfinite(bound) and exact <= bound <= exact * 1.01


def test_rescale_keeps_a_kernel_inside_unchanged_and_lands_on_the_bound(rng):
    constraint = OperatorNormConstraint(1.0, input_shape=8, padding="same")
    kernel = tf.constant(rng.standard_normal((3, 3, 4, 4)).astype(np.float32))
    once = constraint(kernel)
    exact = float(tfconvnorm.conv_operator_norm(tf.cast(once, tf.float64), 8, padding="same"))
    assert 0.99 <= exact <= 1.0
    np.testing.assert_array_equal(constraint(once), once)  # idempotent
    small = kernel * 1e-3
    np.testing.assert_array_equal(constraint(small), small)
    assert float(constraint.norm_upper_bound(once)) <= 1.0


def _every_kind_model():
    init = keras.initializers.RandomNormal(stddev=1.0)
    seq_in = keras.Input((15, 3))
    s = keras.layers.Conv1D(4, 3, padding="causal", kernel_initializer=init, use_bias=False, name="c1")(seq_in)
    s = keras.layers.Conv1D(4, 3, strides=2, padding="same", kernel_initializer=init,
                            use_bias=False, name="c1s")(s)
    s = keras.layers.GlobalAveragePooling1D()(s)
    img = keras.Input((11, 11, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", kernel_initializer=init,
                            use_bias=False, name="strided")(img)
    x = keras.layers.Conv2D(8, 3, padding="valid", kernel_initializer=init, use_bias=False, name="valid")(x)
    x = keras.layers.Conv2D(8, 3, dilation_rate=2, padding="same", kernel_initializer=init,
                            use_bias=False, name="dilated")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same",
                                     depthwise_initializer=init, use_bias=False, name="depthwise")(x)
    x = keras.layers.SeparableConv2D(8, 3, strides=2, padding="same", depthwise_initializer=init,
                                     pointwise_initializer=init, use_bias=False, name="separable")(x)
    x = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", kernel_initializer=init,
                                     use_bias=False, name="transposed")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    vol = keras.Input((6, 6, 6, 2))
    v = keras.layers.Conv3D(4, 3, padding="same", kernel_initializer=init, use_bias=False, name="c3")(vol)
    v = keras.layers.GlobalAveragePooling3D()(v)
    x = keras.layers.Concatenate()([s, x, v])
    out = keras.layers.Dense(3, kernel_initializer=init, use_bias=False, name="dense")(x)
    return keras.Model([seq_in, img, vol], out)


@pytest.mark.parametrize("jit_compile,method", [
    # "exact" under XLA: test_projections_under_xla_hold_the_bound_and_follow_the_eigh_path.
    (True, "rescale"), (False, "rescale"),
    pytest.param(True, "alternating", marks=pytest.mark.slow)])
def test_constrain_then_compile_with_and_without_xla_keeps_every_real_layer_bounded(
        jit_compile, method, rng):
    model = _every_kind_model()
    operators = geometry.model_geometry(model)
    assert max(oracles.true_norm(op) for op in operators) > 1.0  # work to do
    # "exact" capped: Dykstra's loop in every step of every layer is slow.
    tfconvnorm.constrain(model, 0.5, method=method,
                         iterations=20 if method == "exact" else None)
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)
    data = [rng.standard_normal((16, 15, 3)), rng.standard_normal((16, 11, 11, 3)),
            rng.standard_normal((16, 6, 6, 6, 2))]
    model.fit(data, rng.standard_normal((16, 3)), batch_size=8, epochs=1, verbose=0)
    assert model.jit_compile == jit_compile  # constrain() left XLA as the user set it
    for op in operators:
        # The Keras layer itself on every basis vector, in float64.
        layer = op.layer
        parts = oracles.keras_part_matrices(layer, tuple(layer.input.shape[1:]))
        attribute = op.name.split("/")[-1]
        matrix = parts[attribute][0]
        assert np.linalg.norm(matrix, 2) <= 0.5, op.name


def test_regularizer_compiles_under_xla_and_penalises_the_bound(rng):
    kernel = tf.Variable(rng.standard_normal((3, 3, 2, 3)).astype(np.float32))
    regularizer = tfconvnorm.OperatorNormRegularizer(2.0, input_shape=6, threshold=0.5,
                                                     padding="same")
    exact = float(tfconvnorm.conv_operator_norm(tf.cast(kernel, tf.float64), 6, padding="same"))

    @tf.function(jit_compile=True)
    def penalty_and_gradient():
        with tf.GradientTape() as tape:
            penalty = regularizer(kernel)
        return penalty, tape.gradient(penalty, kernel)

    penalty, gradient = penalty_and_gradient()
    assert 2 * (exact - 0.5) <= float(penalty) <= 2 * (exact * 1.01 - 0.5)
    assert np.all(np.isfinite(gradient.numpy())) and np.any(gradient.numpy() != 0)


def test_keras_file_written_by_the_eigh_path_loads_and_constrains(rng):
    # Written at commit 7057c1a (before the matmul path) by the same model code.
    model = keras.models.load_model(DATA / "constrained_pre_matmul.keras")
    operators = geometry.model_geometry(model)
    constraints = {op.name: op.variable.constraint for op in operators}
    assert all(isinstance(c, OperatorNormConstraint) for c in constraints.values())
    assert constraints["dense/kernel"].method == "paper"
    model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=False)
    model.fit([rng.standard_normal((8, 16, 3)), rng.standard_normal((8, 16, 16, 3))],
              rng.standard_normal((8, 3)), epochs=1, verbose=0)
    for op in operators:
        assert oracles.true_norm(op) <= 0.5 * (1 + 1e-4), op.name


@pytest.mark.parametrize("method", ["paper", "alternating", pytest.param("exact", marks=pytest.mark.slow),
                                    "rescale"])
def test_clipper_every_method_with_an_xla_compiled_model(method, rng):
    # The clipper projects outside the train step (its own non-XLA function), so
    # an XLA-compiled model and a constrained one coexist with it.
    model = keras.Sequential([keras.Input((8, 8, 2)),
                              keras.layers.Conv2D(4, 3, padding="same", name="a",
                                                  kernel_initializer=keras.initializers.RandomNormal(stddev=2.0)),
                              keras.layers.Conv2D(4, 3, strides=2, padding="same", name="b"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="fc")])
    tfconvnorm.constrain(model, 2.0, layers=["fc"])
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=True)
    clipper = tfconvnorm.OperatorNormClipper(0.5, every_n_steps=2, method=method,
                                             kinds=tfconvnorm.CONV_KINDS)
    model.fit(rng.standard_normal((16, 8, 8, 2)), rng.standard_normal((16, 2)), batch_size=4,
              epochs=1, verbose=0, callbacks=[clipper])
    assert model.jit_compile and clipper.last_projection["step"] == 4
    slack = 1.3 if method == "paper" else 1 + 1e-4  # the paper's clip does not guarantee it
    for op in geometry.model_geometry(model, kinds=tfconvnorm.CONV_KINDS):
        assert oracles.circular_norm(op) <= 0.5 * slack, op.name


def _constraint_and_eigh_args(shape, size, strides, dilation, groups, padding, max_norm, method,
                              iterations=None):
    constraint = OperatorNormConstraint(max_norm, input_shape=size, strides=strides,
                                        dilation_rate=dilation, groups=groups, method=method,
                                        iterations=iterations, padding=padding)
    args = dict(input_shape=size, strides=strides, dilation_rate=dilation, groups=groups,
                padding=padding)
    return constraint, args


@pytest.mark.parametrize("shape,size,strides,dilation,groups,padding",
                         _sampled(GRID, _FAST + (5, 12)))
def test_paper_clip_under_xla_matches_the_eigh_clip(shape, size, strides, dilation, groups,
                                                    padding, rng):
    # The published single clip has no certificate: what is checked is that the
    # matrix iterations compute the same kernel as the eigh path (float64 on a
    # few geometries: each dtype is one more XLA compilation).
    dtypes = [(np.float32, 2e-5)]
    if (shape, size) in ((GRID[3][0], GRID[3][1]), (GRID[6][0], GRID[6][1]),
                         (GRID[8][0], GRID[8][1])):
        dtypes.append((np.float64, 1e-7))
    for dtype, rtol in dtypes:
        kernel = rng.standard_normal(shape).astype(dtype)
        exact = float(tfconvnorm.conv_operator_norm(tf.constant(kernel, tf.float64), **args_of(
            size, strides, dilation, groups, padding)))
        constraint, args = _constraint_and_eigh_args(shape, size, strides, dilation, groups,
                                                     padding, exact / 2, "paper")
        ours = tf.function(constraint, jit_compile=True)(tf.constant(kernel)).numpy()
        reference_kernel = tfconvnorm.clip_conv_singular_values(
            tf.constant(kernel, tf.float64), max_norm=exact / 2, method="paper", **args).numpy()
        assert ours.dtype == dtype
        scale = np.abs(reference_kernel).max()
        np.testing.assert_allclose(ours / scale, reference_kernel / scale, atol=rtol)


def args_of(size, strides, dilation, groups, padding):
    return dict(input_shape=size, strides=strides, dilation_rate=dilation, groups=groups,
                padding=padding)


# A subset of GRID (strided odd, dilated, grouped, causal 1-D, Dense): each case
# compiles both projections under XLA, seconds apiece.
PROJECTION_GRID = [GRID[i] for i in (3, 5, 6, 8, 11)]


@pytest.mark.parametrize("shape,size,strides,dilation,groups,padding", PROJECTION_GRID)
@pytest.mark.parametrize("method", ["alternating", "exact"])
def test_projections_under_xla_hold_the_bound_and_follow_the_eigh_path(
        shape, size, strides, dilation, groups, padding, method, rng):
    kernel = rng.standard_normal(shape).astype(np.float32)
    args = args_of(size, strides, dilation, groups, padding)
    exact = float(tfconvnorm.conv_operator_norm(tf.constant(kernel, tf.float64), **args))
    max_norm = exact / 2
    constraint, _ = _constraint_and_eigh_args(shape, size, strides, dilation, groups, padding,
                                              max_norm, method)
    compiled = tf.function(constraint, jit_compile=True)
    ours = compiled(tf.constant(kernel)).numpy()
    after = float(tfconvnorm.conv_operator_norm(tf.constant(ours, tf.float64), **args))
    # Certified as computed: the float32 result's true norm.
    assert 0.99 * max_norm <= after <= max_norm, (after, max_norm)
    reference_kernel = tfconvnorm.clip_conv_singular_values(
        tf.constant(kernel, tf.float64), max_norm=max_norm, method=method, **args).numpy()
    gap = np.linalg.norm(ours - reference_kernel) / np.linalg.norm(reference_kernel)
    assert gap <= 2e-3, gap
    # Our own output is inside: a second call returns it unchanged.
    np.testing.assert_array_equal(compiled(tf.constant(ours)).numpy(), ours)


@pytest.mark.parametrize("method", ["paper", "alternating", "exact", "rescale"])
def test_projections_of_huge_tiny_and_zero_kernels_stay_finite(method, rng):
    constraint = OperatorNormConstraint(1.0, input_shape=6, padding="same", method=method)
    compiled = tf.function(constraint, jit_compile=True)
    base = rng.standard_normal((3, 3, 2, 3))
    for scale in (1e30, 1e-30, 0.0):
        kernel = tf.constant((base * scale).astype(np.float32))
        out = compiled(kernel).numpy()
        assert np.all(np.isfinite(out)), scale
        norm = float(tfconvnorm.conv_operator_norm(tf.constant(out, tf.float64), 6,
                                                   padding="same"))
        if scale <= 1e-30:
            np.testing.assert_array_equal(out, kernel.numpy())  # inside: untouched
        elif method != "paper":
            assert 0.99 <= norm <= 1.0, (method, norm)


def test_exact_projection_refuses_folded_taps():
    constraint = OperatorNormConstraint(0.5, input_shape=3, method="exact")
    with pytest.raises(ValueError, match="method='exact'.*alternating"):
        constraint(tf.ones((5, 5, 2, 2)))


def test_in_a_graph_without_xla_the_constraint_runs_as_one_shared_xla_cluster(rng):
    # A non-XLA train step would otherwise run the matmul path op by op, about
    # 40 small ops per squaring (most of its cost there: BENCHMARKS.md).
    same_a = OperatorNormConstraint(0.5, input_shape=6, strides=2, padding="same")
    same_b = OperatorNormConstraint(0.5, input_shape=6, strides=2, padding="same")
    other = OperatorNormConstraint(0.7, input_shape=6, strides=2, padding="same")
    assert constraints_lib._xla_projection(same_a) is constraints_lib._xla_projection(same_b)
    assert constraints_lib._xla_projection(same_a) is not constraints_lib._xla_projection(other)
    kernel = tf.constant(rng.standard_normal((3, 3, 2, 3)).astype(np.float32))
    step = tf.function(lambda k: [same_a(k), same_b(k), other(k)])
    calls = [op for op in step.get_concrete_function(kernel).graph.get_operations()
             if "_XlaMustCompile" in op.node_def.attr]
    assert len(calls) == 3 and all(op.get_attr("_XlaMustCompile") for op in calls)
    for constraint, got in zip((same_a, same_b, other), step(kernel)):
        # Eagerly the same matmul path runs op by op: the same kernel to rounding.
        np.testing.assert_allclose(got, constraint(kernel), rtol=1e-5, atol=1e-7)
        assert float(tfconvnorm.conv_operator_norm(tf.cast(got, tf.float64), 6, strides=2,
                                                   padding="same")) <= constraint.max_norm
