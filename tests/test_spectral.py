"""tfconvnorm.spectral against the explicit operator matrix and hand-worked spectra."""

import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from tfconvnorm import reference
from tfconvnorm.spectral import operator as spectral_operator

# (kernel shape, input shape, strides, dilation, groups): every structure the
# core exploits or has to get right, each checked against the dense matrix.
GEOMETRIES = [
    # 2-D, square and rectangular kernels and inputs.
    ((3, 3, 2, 3), (6, 6), 1, 1, 1),
    ((3, 2, 2, 3), (5, 7), 1, 1, 1),
    ((1, 3, 2, 3), (4, 6), 1, 1, 1),
    # 1-D and 3-D.
    ((3, 2, 3), (8,), 1, 1, 1),
    ((5, 1, 1), (7,), 1, 1, 1),
    ((3, 3, 3, 2, 2), (4, 4, 4), 1, 1, 1),
    ((2, 3, 2, 2, 3), (4, 3, 4), (2, 1, 2), 1, 1),
    # Strides, per axis too; rows > cols and rows < cols after the polyphase split.
    ((3, 3, 2, 3), (8, 6), 2, 1, 1),
    ((3, 3, 2, 9), (6, 6), (2, 3), 1, 1),
    ((3, 3, 1, 2), (6, 6), 3, 1, 1),
    ((3, 1, 4), (12,), 4, 1, 1),
    # Dilation, alone and with strides.
    ((3, 3, 2, 5), (8, 8), (2, 1), (1, 2), 1),
    ((3, 2, 2), (9,), 1, 3, 1),
    # Inputs smaller than the (dilated) kernel: wrapped taps fold.
    ((3, 3, 2, 4), (2, 2), 1, 1, 1),
    ((5, 3, 2, 4), (3, 4), 1, 2, 1),
    ((7, 1, 2), (4,), 2, 1, 1),
    # Groups and depthwise (groups == c_in), with strides.
    ((3, 3, 1, 6), (6, 6), 1, 1, 3),
    ((3, 3, 2, 6), (6, 6), 2, 1, 3),
    ((3, 3, 1, 8), (4, 4), 1, 1, 4),
    ((3, 1, 4), (8,), 2, 1, 4),
    # Frequency-independent matrices: 1x1 convs, 2x2 stride-2 "patchify".
    ((1, 1, 4, 3), (5, 5), 1, 1, 1),
    ((1, 1, 4, 3), (6, 6), 2, 1, 1),
    ((2, 2, 4, 3), (6, 6), 2, 1, 1),
    ((1, 3, 2, 2), (6, 6), 2, 1, 1),
    # A Dense layer: a matrix, no spatial axes.
    ((4, 5), (), 1, 1, 1),
    ((6, 2), (), 1, 1, 1),
]


def _ids(cases):
    return [f"k{c[0]}-n{c[1]}-s{c[2]}-d{c[3]}-g{c[4]}" for c in cases]


def _random_kernel(shape, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("shape,n,strides,dilation,groups", GEOMETRIES, ids=_ids(GEOMETRIES))
def test_singular_values_match_explicit_matrix_float64(shape, n, strides, dilation, groups):
    kernel = _random_kernel(shape)
    expected = reference.explicit_singular_values(kernel, n, strides, dilation, groups)
    got = tfconvnorm.conv_singular_values(kernel, n, strides, dilation, groups)
    assert got.dtype == tf.float64
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10 * expected[0])


@pytest.mark.parametrize("shape,n,strides,dilation,groups", GEOMETRIES, ids=_ids(GEOMETRIES))
def test_singular_values_match_explicit_matrix_float32(shape, n, strides, dilation, groups):
    kernel = _random_kernel(shape, np.float32, seed=1)
    expected = reference.explicit_singular_values(kernel, n, strides, dilation, groups)
    got = tfconvnorm.conv_singular_values(tf.constant(kernel), n, strides, dilation, groups)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6 * expected[0])


@pytest.mark.parametrize("shape,n,strides,dilation,groups", GEOMETRIES, ids=_ids(GEOMETRIES))
def test_operator_norm_is_largest_singular_value(shape, n, strides, dilation, groups):
    kernel = _random_kernel(shape, seed=2)
    expected = reference.explicit_singular_values(kernel, n, strides, dilation, groups)[0]
    got = tfconvnorm.conv_operator_norm(kernel, n, strides, dilation, groups)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_count_for_strided_conv_is_as_stated():
    # (n/s)^d * min(c_out, c_in * s^d) singular values, zeros included.
    kernel = _random_kernel((3, 3, 2, 16))
    values = tfconvnorm.conv_singular_values(kernel, (8, 8), strides=2)
    assert values.shape == (4 * 4 * min(16, 2 * 4),)


def test_rank_deficient_operator_keeps_exact_zeros():
    # Two identical output channels: half the singular values are exactly 0,
    # which the float32 Gram route must not turn into sqrt(eps) noise.
    column = _random_kernel((3, 3, 4, 1), np.float32)
    kernel = np.concatenate([column, column], axis=-1)
    got = tfconvnorm.conv_singular_values(kernel, (6, 6)).numpy()
    expected = reference.explicit_singular_values(kernel, (6, 6))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * expected[0])
    assert np.sum(got < 1e-6 * got[0]) == 36


def test_hand_worked_1d_filter():
    # A single-channel circular filter is diagonalised by the DFT: its
    # singular values are |2 + 7 z - z^2| at z = exp(-2 pi i w / 20).
    z = np.exp(-2j * np.pi * np.arange(20) / 20)
    expected = np.sort(np.abs(2 + 7 * z - z ** 2))[::-1]
    got = tfconvnorm.conv_singular_values(np.array([2.0, 7.0, -1.0]).reshape(3, 1, 1), 20)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_hand_worked_3x3_single_channel():
    kernel = np.array([[1.0, 2.0, 0.0], [-1.0, 3.0, 1.0], [0.5, 0.0, -2.0]])
    n = 5
    w = np.exp(-2j * np.pi * np.arange(n) / n)
    response = sum(kernel[a, b] * np.outer(w ** a, w ** b) for a in range(3) for b in range(3))
    expected = np.sort(np.abs(response).ravel())[::-1]
    got = tfconvnorm.conv_singular_values(kernel[..., None, None], (n, n))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_agrees_with_published_method_where_that_is_defined():
    kernel = _random_kernel((3, 3, 4, 5))
    published = np.sort(reference.published_singular_values(kernel, (8, 8)).ravel())[::-1]
    np.testing.assert_allclose(tfconvnorm.conv_singular_values(kernel, (8, 8)).numpy(),
                               published, rtol=1e-10)


def test_published_method_crops_small_inputs_and_we_do_not():
    kernel = _random_kernel((3, 3, 2, 2))
    exact = reference.explicit_singular_values(kernel, (2, 2))
    published = np.sort(reference.published_singular_values(kernel, (2, 2)).ravel())[::-1]
    ours = tfconvnorm.conv_singular_values(kernel, (2, 2)).numpy()
    np.testing.assert_allclose(ours, exact, rtol=1e-10)
    assert not np.allclose(published, exact, rtol=1e-3)


def test_transfer_matrices_weights_cover_the_full_spectrum():
    kernel = _random_kernel((3, 3, 2, 6))
    matrices, weights = tfconvnorm.conv_transfer_matrices(kernel, (8, 6), strides=2, groups=2)
    # Conjugate symmetry: 4 x (3 // 2 + 1) frequencies computed of 4 x 3.
    assert matrices.shape == (4 * 2, 2, 3, 4 * 2)
    assert int(tf.reduce_sum(weights)) == 4 * 3
    # 1x1: one frequency stands for all.
    matrices, weights = tfconvnorm.conv_transfer_matrices(kernel[:1, :1], (8, 6))
    assert matrices.shape[0] == 1 and int(weights[0]) == 48


def test_transfer_matrices_are_the_kernel_dft_per_frequency():
    # Independent of the core: at stride 1, P(w) = sum_t K[t]^T exp(-i w.t), i.e. the
    # transposed channel matrix of np.fft.fft2 of the zero-padded kernel, for the
    # frequencies kept (the last axis halved by conjugate symmetry).
    kernel = _random_kernel((3, 2, 3, 4))
    matrices, _ = tfconvnorm.conv_transfer_matrices(kernel, (6, 5))
    fft = np.fft.fft2(kernel, (6, 5), axes=(0, 1))[:, :3]       # (6, 3, c_in, c_out)
    expected = np.swapaxes(fft, -1, -2).reshape(6 * 3, 1, 4, 3)
    np.testing.assert_allclose(matrices.numpy(), expected, rtol=1e-12, atol=1e-12)
    # Groups: group g maps input channels [g c_in/G, ...) to outputs [g c_out/G, ...).
    kernel = _random_kernel((3, 3, 2, 6))
    matrices, _ = tfconvnorm.conv_transfer_matrices(kernel, (4, 4), groups=3)
    fft = np.fft.fft2(kernel, (4, 4), axes=(0, 1))[:, :3]
    for g in range(3):
        block = np.swapaxes(fft[..., 2 * g:2 * g + 2], -1, -2).reshape(12, 2, 2)
        np.testing.assert_allclose(matrices.numpy()[:, g], block, rtol=1e-12, atol=1e-12)


def test_accepts_variables_and_preserves_dtype():
    variable = tf.Variable(_random_kernel((3, 3, 2, 2), np.float32))
    values = tfconvnorm.conv_singular_values(variable, 4)
    assert values.dtype == tf.float32 and values.shape == (32,)
    assert tfconvnorm.conv_operator_norm(variable, 4).dtype == tf.float32


def test_graph_mode_with_static_shapes():
    kernel = _random_kernel((3, 3, 2, 4), np.float32)

    @tf.function
    def everything(k):
        return (tfconvnorm.conv_singular_values(k, (6, 6), strides=2),
                tfconvnorm.conv_operator_norm(k, (6, 6), strides=2),
                tfconvnorm.clip_conv_singular_values(k, (6, 6), 0.5, strides=2),
                tfconvnorm.clip_conv_singular_values(k, (6, 6), 0.5, method="paper"),
                tfconvnorm.clip_conv_singular_values(k, (6, 6), 0.5, method="exact",
                                                     iterations=50))

    values, norm, clipped, paper, exact = everything(tf.constant(kernel))
    np.testing.assert_allclose(values.numpy(),
                               tfconvnorm.conv_singular_values(kernel, (6, 6), 2).numpy(),
                               rtol=1e-6)
    assert norm.numpy() == pytest.approx(values.numpy()[0], rel=1e-6)
    for result in (clipped, paper, exact):
        assert result.shape == kernel.shape and result.dtype == tf.float32
    assert tfconvnorm.conv_operator_norm(clipped, (6, 6), 2).numpy() <= 0.5 * (1 + 1e-4)


def test_operator_norm_gradient_matches_finite_difference():
    kernel = _random_kernel((3, 3, 3, 4), seed=3)
    direction = _random_kernel(kernel.shape, seed=4)
    variable = tf.Variable(kernel)
    for strides in (1, 2):
        with tf.GradientTape() as tape:
            norm = tfconvnorm.conv_operator_norm(variable, (8, 8), strides=strides)
        gradient = tape.gradient(norm, variable).numpy()
        step = 1e-6
        finite = (tfconvnorm.conv_operator_norm(kernel + step * direction, (8, 8), strides)
                  - tfconvnorm.conv_operator_norm(kernel - step * direction, (8, 8), strides)
                  ).numpy() / (2 * step)
        assert np.sum(gradient * direction) == pytest.approx(finite, rel=1e-6)


# --- errors -----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel=np.ones((3, 3, 2, 2)), input_shape=(8,)), "input_shape"),
    (dict(kernel=np.ones((3, 3, 2, 2)), input_shape=(8, 0)), "input_shape"),
    (dict(kernel=np.ones((3, 3, 2, 2)), input_shape=(8, -3)), "input_shape"),
    (dict(kernel=np.ones((3, 3, 2, 3)), input_shape=(8, 8), groups=2), "groups=2"),
    (dict(kernel=np.ones((3, 3, 2, 2)), input_shape=(8, 8), groups=0), "groups=0"),
    (dict(kernel=np.ones((3, 3, 2, 2)), input_shape=(8, 8), strides=0), "strides"),
    (dict(kernel=np.ones((3, 3, 2, 2)), input_shape=(8, 8), dilation_rate=(1, 0)),
     "dilation_rate"),
    (dict(kernel=np.ones((3,)), input_shape=()), "shape"),
    (dict(kernel=np.ones((3, 0, 2)), input_shape=(4,)), "empty"),
])
def test_bad_geometry_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfconvnorm.conv_singular_values(**kwargs)


def test_stride_not_dividing_input_names_both_numbers():
    with pytest.raises(ValueError, match=r"3 does not divide 8"):
        tfconvnorm.conv_singular_values(np.ones((3, 3, 1, 1)), (8, 8), strides=3)


def test_complex_kernel_is_rejected():
    with pytest.raises(TypeError, match="complex"):
        tfconvnorm.conv_singular_values(np.ones((3, 1, 1), np.complex64), 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_kernel_raises_eager_and_graph(bad):
    kernel = np.ones((3, 3, 2, 2), np.float32)
    kernel[1, 1, 0, 0] = bad
    for fn in (tfconvnorm.conv_singular_values, tfconvnorm.conv_operator_norm):
        with pytest.raises(tf.errors.InvalidArgumentError, match="kernel has NaN or Inf"):
            fn(kernel, (4, 4))
        with pytest.raises(tf.errors.InvalidArgumentError, match="kernel has NaN or Inf"):
            tf.function(lambda k: fn(k, (4, 4)))(tf.constant(kernel))
    with pytest.raises(tf.errors.InvalidArgumentError, match="kernel has NaN or Inf"):
        tfconvnorm.clip_conv_singular_values(kernel, (4, 4), 1.0)


# --- projections ----------------------------------------------------------

CLIP_GEOMETRIES = [
    ((3, 3, 4, 5), (8, 8), 1, 1, 1),
    ((3, 3, 3, 6), (8, 8), 2, 1, 1),
    ((3, 3, 2, 4), (8, 8), 1, 2, 2),
    ((3, 3, 1, 4), (6, 6), 1, 1, 4),
    ((5, 2, 3), (10,), 1, 1, 1),
    ((3, 3, 3, 2, 2), (4, 4, 4), 1, 1, 1),
    ((3, 3, 2, 3), (2, 2), 1, 1, 1),  # folded taps
    ((1, 1, 5, 3), (4, 4), 2, 1, 1),
    ((5, 3), (), 1, 1, 1),
]


def _norm(kernel, n, strides=1, dilation=1, groups=1):
    # The bound is checked against the independent oracle, not our own norm.
    return reference.explicit_singular_values(np.asarray(kernel), n, strides, dilation,
                                              groups)[0]


@pytest.mark.parametrize("shape,n,strides,dilation,groups", CLIP_GEOMETRIES,
                         ids=_ids(CLIP_GEOMETRIES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_projection_guarantees_the_bound(shape, n, strides, dilation, groups, dtype):
    kernel = 2.0 * _random_kernel(shape, dtype, seed=5)
    max_norm = 0.3 * _norm(kernel, n, strides, dilation, groups)
    clipped = tfconvnorm.clip_conv_singular_values(kernel, n, max_norm, strides, dilation,
                                                   groups)
    assert clipped.shape == kernel.shape and clipped.dtype == kernel.dtype
    # float64: to rounding (a Python float bound once went through float32: 4e-8 over).
    slack = 1e-4 if dtype == np.float32 else 1e-11
    assert _norm(clipped, n, strides, dilation, groups) <= max_norm * (1 + slack)
    # Clipping shrinks only: the result is not the zero kernel.
    assert np.linalg.norm(clipped) > 0.1 * np.linalg.norm(kernel) * 0.3


@pytest.mark.parametrize("method", ["alternating", "exact"])
def test_projection_leaves_kernels_inside_unchanged(method):
    kernel = _random_kernel((3, 3, 4, 4), seed=6)
    norm = _norm(kernel, (8, 8))
    same = tfconvnorm.clip_conv_singular_values(kernel, (8, 8), 1.01 * norm, method=method)
    np.testing.assert_array_equal(same.numpy(), kernel)
    # Idempotent: projecting a projection changes nothing.
    once = tfconvnorm.clip_conv_singular_values(kernel, (8, 8), 0.5 * norm, method=method)
    twice = tfconvnorm.clip_conv_singular_values(once, (8, 8), 0.5 * norm, method=method)
    np.testing.assert_array_equal(twice.numpy(), once.numpy())


@pytest.mark.parametrize("shape,n", [((3, 3, 4, 5), (8, 8)), ((3, 3, 2, 2), (3, 5)),
                                     ((5, 5, 3, 3), (16, 16))])
@pytest.mark.parametrize("relative_bound", [None, 0.97])
def test_paper_method_matches_published_reference(shape, n, relative_bound):
    # relative_bound=0.97: just under the norm, so that only a few
    # frequencies are over it and only those are decomposed (the other branch
    # of the projection); None: bound 1, every frequency over it.
    kernel = _random_kernel(shape, seed=7)
    max_norm = 1.0 if relative_bound is None else relative_bound * _norm(kernel, n)
    expected = reference.published_clip(kernel, n, max_norm)
    got = tfconvnorm.clip_conv_singular_values(kernel, n, max_norm, method="paper")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5,
                               atol=1e-12 * np.abs(expected).max())


def test_paper_method_can_miss_the_bound_and_default_does_not():
    # Why the default exists: the cut back to the support raises the norm.
    kernel = _random_kernel((3, 3, 8, 8), seed=8)
    paper = tfconvnorm.clip_conv_singular_values(kernel, (8, 8), 1.0, method="paper")
    assert _norm(paper, (8, 8)) > 1.0 + 1e-3
    default = tfconvnorm.clip_conv_singular_values(kernel, (8, 8), 1.0)
    assert _norm(default, (8, 8)) <= 1.0 + 1e-4


@pytest.mark.parametrize("shape,n,strides", [((3, 3, 4, 5), (8, 8), 1),
                                             ((3, 3, 3, 4), (8, 8), 2),
                                             ((3, 2, 3), (9,), 1)])
def test_exact_projection_is_no_farther_than_default(shape, n, strides):
    kernel = _random_kernel(shape, seed=9)
    max_norm = 0.5 * _norm(kernel, n, strides)
    default = tfconvnorm.clip_conv_singular_values(kernel, n, max_norm, strides)
    exact = tfconvnorm.clip_conv_singular_values(kernel, n, max_norm, strides, method="exact")
    assert _norm(exact, n, strides) <= max_norm * (1 + 1e-4)
    assert np.linalg.norm(exact - kernel) <= np.linalg.norm(default - kernel) * (1 + 1e-6)


def test_exact_projection_satisfies_optimality_against_feasible_points():
    # Projection onto a convex set: <k - p, q - p> <= 0 for every feasible q.
    kernel = _random_kernel((3, 3, 2, 3), seed=10)
    max_norm = 0.4 * _norm(kernel, (6, 6))
    p = tfconvnorm.clip_conv_singular_values(kernel, (6, 6), max_norm, method="exact",
                                             tolerance=1e-10, iterations=5000).numpy()
    rng = np.random.default_rng(11)
    for _ in range(5):
        q = tfconvnorm.clip_conv_singular_values(p + 0.3 * rng.standard_normal(p.shape),
                                                 (6, 6), max_norm).numpy()
        assert np.sum((kernel - p) * (q - p)) <= 1e-6 * np.linalg.norm(kernel) ** 2


def test_exact_projection_refuses_folded_taps():
    with pytest.raises(ValueError, match="method='exact'"):
        tfconvnorm.clip_conv_singular_values(np.ones((3, 3, 1, 1)), (2, 2), 0.5, method="exact")


@pytest.mark.parametrize("max_norm", [0, -1.0, np.nan, np.inf, "1", [1.0, 2.0]])
def test_bad_max_norm_is_a_clear_error(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        tfconvnorm.clip_conv_singular_values(np.ones((3, 3, 1, 1)), (4, 4), max_norm)


def test_bad_max_norm_tensor_in_graph_raises():
    fn = tf.function(lambda k, m: tfconvnorm.clip_conv_singular_values(k, (4, 4), m))
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_norm"):
        fn(tf.ones((3, 3, 1, 1)), tf.constant(-1.0))


def test_unknown_method_and_bad_iterations():
    with pytest.raises(ValueError, match="method='dykstra'"):
        tfconvnorm.clip_conv_singular_values(np.ones((3, 1, 1)), 4, 1.0, method="dykstra")
    with pytest.raises(ValueError, match="iterations=0"):
        tfconvnorm.clip_conv_singular_values(np.ones((3, 1, 1)), 4, 1.0, iterations=0)


@pytest.mark.parametrize("magnitude", [1e-30, 1e26])
def test_projection_and_norm_survive_extreme_magnitudes(magnitude):
    # A diverged-but-finite kernel would overflow float32 Gram matrices;
    # both functions work on scaled copies, so the answer scales exactly.
    kernel = _random_kernel((3, 3, 4, 4), np.float32, seed=12)
    norm = tfconvnorm.conv_operator_norm(kernel, (8, 8)).numpy()
    big = kernel * np.float32(magnitude)
    assert tfconvnorm.conv_operator_norm(big, (8, 8)).numpy() == pytest.approx(
        norm * magnitude, rel=1e-5)
    clipped = tfconvnorm.clip_conv_singular_values(big, (8, 8), 0.5 * norm * magnitude)
    assert np.all(np.isfinite(clipped.numpy()))
    expected = tfconvnorm.clip_conv_singular_values(kernel, (8, 8), 0.5 * norm).numpy()
    np.testing.assert_allclose(clipped.numpy() / magnitude, expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


# --- batches of same-geometry kernels ---------------------------------------


@pytest.mark.parametrize("shape,n,strides,dilation,groups", [
    ((3, 3, 2, 4), (6, 6), 2, 1, 2),
    ((3, 2, 3), (8,), 1, 2, 1),
    ((1, 1, 4, 3), (4, 4), 1, 1, 1),
    ((3, 3, 1, 4), (4, 4), 1, 1, 4),
    ((4, 5), (), 1, 1, 1),
])
def test_batch_functions_equal_one_kernel_at_a_time(shape, n, strides, dilation, groups):
    kernels = [_random_kernel(shape, seed=20 + i) * (i + 1) for i in range(3)]
    values = tfconvnorm.conv_singular_values_batch(kernels, n, strides, dilation, groups)
    norms = tfconvnorm.conv_operator_norm_batch(kernels, n, strides, dilation, groups)
    for b, kernel in enumerate(kernels):
        expected = reference.explicit_singular_values(kernel, n, strides, dilation, groups)
        np.testing.assert_allclose(values[b].numpy(), expected, rtol=1e-8,
                                   atol=1e-10 * expected[0])
        assert norms[b].numpy() == pytest.approx(expected[0], rel=1e-10)
    # Per-kernel projections: one kernel inside (unchanged), two outside.
    max_norm = 1.5 * reference.explicit_singular_values(kernels[0], n, strides, dilation,
                                                        groups)[0]
    for method in ("paper", "alternating"):
        batch = tfconvnorm.clip_conv_singular_values_batch(kernels, n, max_norm, strides,
                                                           dilation, groups, method=method)
        assert batch.shape == (3,) + shape
        for b, kernel in enumerate(kernels):
            single = tfconvnorm.clip_conv_singular_values(kernel, n, max_norm, strides,
                                                          dilation, groups, method=method)
            np.testing.assert_allclose(batch[b].numpy(), single.numpy(), rtol=1e-7,
                                       atol=1e-9 * np.abs(single.numpy()).max())
    np.testing.assert_array_equal(batch[0].numpy(), kernels[0])


def test_batch_exact_projection_matches_single():
    kernels = [_random_kernel((3, 3, 2, 3), seed=30 + i) for i in range(2)]
    max_norm = 0.5 * _norm(kernels[0], (6, 6))
    batch = tfconvnorm.clip_conv_singular_values_batch(kernels, (6, 6), max_norm,
                                                       method="exact", tolerance=1e-10,
                                                       iterations=3000)
    for b, kernel in enumerate(kernels):
        single = tfconvnorm.clip_conv_singular_values(kernel, (6, 6), max_norm, method="exact",
                                                      tolerance=1e-10, iterations=3000)
        np.testing.assert_allclose(batch[b].numpy(), single.numpy(), rtol=1e-5, atol=1e-7)
        assert _norm(batch[b].numpy(), (6, 6)) <= max_norm * (1 + 1e-4)


def test_batch_norm_gradient_is_per_kernel():
    kernels = [tf.Variable(_random_kernel((3, 3, 2, 2), seed=40 + i)) for i in range(2)]
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(tfconvnorm.conv_operator_norm_batch(kernels, (6, 6)))
    gradients = tape.gradient(total, kernels)
    for kernel, gradient in zip(kernels, gradients):
        with tf.GradientTape() as tape:
            norm = tfconvnorm.conv_operator_norm(kernel, (6, 6))
        np.testing.assert_allclose(gradient.numpy(), tape.gradient(norm, kernel).numpy(),
                                   rtol=1e-8, atol=1e-12)


def test_batch_rejects_mixed_shapes_and_single_arrays():
    with pytest.raises(ValueError, match=r"kernels\[1\]"):
        tfconvnorm.conv_singular_values_batch([np.ones((3, 3, 1, 2)), np.ones((3, 3, 1, 3))],
                                              (4, 4))
    with pytest.raises(TypeError, match="list of kernels"):
        tfconvnorm.conv_operator_norm_batch(np.ones((3, 3, 1, 2)), (4, 4))
    with pytest.raises(ValueError, match="empty"):
        tfconvnorm.conv_operator_norm_batch([], (4, 4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_operator_norm_of_wide_layers_screened_by_eigvalsh(dtype):
    # Above 64 channels the candidates for the maximum are screened by a
    # working-precision eigvalsh rather than Gram-iteration bounds.
    for shape, n in [((3, 3, 70, 72), (3, 2)), ((1, 1, 80, 66), (2, 2))]:
        kernels = [_random_kernel(shape, dtype, seed=50 + i) for i in range(2)]
        norms = tfconvnorm.conv_operator_norm_batch(kernels, n).numpy()
        for kernel, norm in zip(kernels, norms):
            expected = reference.explicit_singular_values(kernel, n)[0]
            assert norm == pytest.approx(expected, rel=1e-6 if dtype == np.float32 else 1e-10)


def test_projection_of_wide_layer_guarantees_the_bound():
    # Above 64 channels every frequency is decomposed (no bound screening).
    kernel = _random_kernel((3, 3, 66, 68), np.float32, seed=60)
    max_norm = 0.5 * _norm(kernel, (3, 2))
    for method in ("paper", "alternating"):
        clipped = tfconvnorm.clip_conv_singular_values(kernel, (3, 2), max_norm, method=method)
        if method == "alternating":
            assert _norm(clipped, (3, 2)) <= max_norm * (1 + 1e-4)
        else:  # one clip then cut: close to the bound, and far below the input's norm
            assert _norm(clipped, (3, 2)) < 1.5 * max_norm
    paper = tfconvnorm.clip_conv_singular_values(kernel.astype(np.float64), (4, 4), max_norm,
                                                 method="paper")
    expected = reference.published_clip(kernel.astype(np.float64), (4, 4), max_norm)
    np.testing.assert_allclose(paper.numpy(), expected, rtol=1e-5,
                               atol=1e-8 * np.abs(expected).max())


# --- many kernels of mixed geometries ---------------------------------------

# Shapes chosen so that matrices of different layers share sizes and get
# pooled: (3, 3, 2, 4) at stride 1 and (1, 1, 2, 4) both give 4x2 matrices.
MIXED = [
    ((3, 3, 2, 4), dict(input_shape=(6, 6)), np.float64),
    ((3, 3, 2, 4), dict(input_shape=(6, 6)), np.float64),          # stacked with the first
    ((1, 1, 2, 4), dict(input_shape=(4, 4), strides=1), np.float64),
    ((3, 3, 2, 4), dict(input_shape=(8, 8), strides=2), np.float64),
    ((3, 3, 1, 6), dict(input_shape=(4, 4), groups=3, dilation_rate=2), np.float64),
    ((3, 2, 3), dict(input_shape=(7,)), np.float32),
    ((3, 3, 2, 4), dict(input_shape=(6, 6)), np.float32),          # same shape, other dtype
    ((5, 3), dict(input_shape=()), np.float64),
    ((2, 3, 2, 2, 3), dict(input_shape=(4, 3, 4), strides=(2, 1, 2)), np.float32),
    ((3, 2, 4), dict(input_shape=(9,), dilation_rate=3), np.float64),
]


def _mixed_kernels(scale_first=1.0):
    kernels = [_random_kernel(shape, dtype, seed=70 + i) for i, (shape, _, dtype) in
               enumerate(MIXED)]
    kernels[0] = kernels[0] * scale_first
    return kernels, [geometry for _, geometry, _ in MIXED]


def _explicit(kernel, geometry):
    g = dict(dict(strides=1, dilation_rate=1, groups=1), **geometry)
    return reference.explicit_singular_values(np.asarray(kernel, np.float64), g["input_shape"],
                                              g["strides"], g["dilation_rate"], g["groups"])


def test_many_spectra_and_norms_match_explicit_matrix():
    kernels, geometries = _mixed_kernels()
    values = tfconvnorm.conv_singular_values_many(kernels, geometries)
    norms = tfconvnorm.conv_operator_norm_many(kernels, geometries)
    assert len(values) == len(norms) == len(kernels)
    for kernel, geometry, value, norm in zip(kernels, geometries, values, norms):
        expected = _explicit(kernel, geometry)
        assert value.dtype == norm.dtype == tf.as_dtype(kernel.dtype)
        rtol = 1e-8 if kernel.dtype == np.float64 else 1e-4
        np.testing.assert_allclose(value.numpy(), expected, rtol=rtol, atol=rtol * expected[0])
        assert float(norm) == pytest.approx(expected[0], rel=1e-10 if rtol == 1e-8 else 1e-6)


@pytest.mark.parametrize("method", ["paper", "alternating", "exact"])
def test_many_projections_equal_one_kernel_at_a_time(method):
    # kernels[0] is scaled down to sit inside the bound: it must come back as is.
    kernels, geometries = _mixed_kernels(scale_first=0.05)
    if method == "exact":  # needs unfolded taps
        kernels, geometries = kernels[:4] + kernels[5:], geometries[:4] + geometries[5:]
    max_norm = 1.2
    many = tfconvnorm.clip_conv_singular_values_many(kernels, geometries, max_norm,
                                                     method=method)
    for kernel, geometry, got in zip(kernels, geometries, many):
        single = tfconvnorm.clip_conv_singular_values(kernel, max_norm=max_norm, method=method,
                                                      **geometry)
        assert got.shape == kernel.shape and got.dtype == tf.as_dtype(kernel.dtype)
        np.testing.assert_allclose(got.numpy(), single.numpy(), rtol=1e-5,
                                   atol=1e-7 * np.abs(single.numpy()).max())
        if method != "paper":
            assert _explicit(got, geometry)[0] <= max_norm * (1 + 1e-4)
    if method != "paper":
        np.testing.assert_array_equal(many[0].numpy(), kernels[0])


def test_many_accepts_layer_geometries_and_differentiates():
    import keras  # pylint: disable=g-import-not-at-top
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(3, 3, strides=2),
                              keras.layers.Conv2D(4, 1)])
    operators = tfconvnorm.model_geometry(model)
    kernels = [op.variable for op in operators]
    with tf.GradientTape() as tape:
        norms = tfconvnorm.conv_operator_norm_many(kernels, [op.geometry for op in operators])
        total = tf.add_n(norms)
    gradients = tape.gradient(total, kernels)
    for op, norm, gradient in zip(operators, norms, gradients):
        with tf.GradientTape() as tape:
            single = tfconvnorm.conv_operator_norm(op.variable,
                                                   **op.geometry.spectral_kwargs())
        assert float(norm) == pytest.approx(float(single), rel=1e-6)
        np.testing.assert_allclose(gradient.numpy(), tape.gradient(single, op.variable).numpy(),
                                   rtol=1e-5, atol=1e-7)


def test_many_bad_input_names_the_entry():
    kernel = np.ones((3, 3, 1, 2))
    with pytest.raises(ValueError, match="same length"):
        tfconvnorm.conv_operator_norm_many([kernel, kernel], [dict(input_shape=(4, 4))])
    with pytest.raises(ValueError, match=r"kernels\[1\]: strides=\(3, 3\) do not divide"):
        tfconvnorm.conv_singular_values_many(
            [kernel, kernel], [dict(input_shape=(4, 4)), dict(input_shape=(4, 4), strides=3)])
    with pytest.raises(ValueError, match=r"geometries\[0\].*unknown keys \['boundary'\]"):
        tfconvnorm.conv_operator_norm_many([kernel], [dict(input_shape=(4, 4), boundary="zero")])
    with pytest.raises(ValueError, match=r"padding must be one of .* got padding=1"):
        tfconvnorm.conv_operator_norm_many([kernel], [dict(input_shape=(4, 4), padding=1)])
    with pytest.raises(TypeError, match="kernels must be a list"):
        tfconvnorm.conv_operator_norm_many(kernel, [dict(input_shape=(4, 4))])
    with pytest.raises(ValueError, match="empty"):
        tfconvnorm.clip_conv_singular_values_many([], [], 1.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"kernels\[1\] has NaN"):
        tfconvnorm.clip_conv_singular_values_many(
            [kernel, np.full_like(kernel, np.nan)], [dict(input_shape=(4, 4))] * 2, 1.0)
    with pytest.raises(ValueError, match=r"kernels\[1\]: method='exact' needs"):
        tfconvnorm.clip_conv_singular_values_many(
            [kernel, kernel], [dict(input_shape=(4, 4)), dict(input_shape=(2, 2))], 1.0,
            method="exact")


# --- the per-axis transform (geometries too big for one combined factor) ----


@pytest.mark.parametrize("shape,n,strides,dilation,groups",
                         [GEOMETRIES[i] for i in (0, 5, 6, 8, 11, 14, 17, 21)],
                         ids=_ids([GEOMETRIES[i] for i in (0, 5, 6, 8, 11, 14, 17, 21)]))
def test_per_axis_transform_matches_explicit_matrix(monkeypatch, shape, n, strides, dilation,
                                                     groups):
    monkeypatch.setattr(spectral_operator, "COMBINED_FACTOR_MAX_ENTRIES", 0)
    kernel = _random_kernel(shape, seed=80)
    geometry = spectral_operator.Geometry(tf.TensorShape(shape), n, strides, dilation, groups)
    assert geometry.combined is None
    expected = reference.explicit_singular_values(kernel, n, strides, dilation, groups)
    got = tfconvnorm.conv_singular_values(kernel, n, strides, dilation, groups)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10 * expected[0])
    # The inverse transform too: a kernel deep inside survives a clip-and-cut.
    same = tfconvnorm.clip_conv_singular_values(kernel, n, 10 * expected[0], strides, dilation,
                                                groups, method="paper")
    np.testing.assert_allclose(same.numpy(), kernel, rtol=1e-10, atol=1e-12) if not \
        geometry.folded else None
    clipped = tfconvnorm.clip_conv_singular_values(kernel, n, 0.5 * expected[0], strides,
                                                   dilation, groups)
    assert _norm(clipped, n, strides, dilation, groups) <= 0.5 * expected[0] * (1 + 1e-8)


@pytest.mark.parametrize("shape,n,strides", [
    ((3, 3, 40, 36), (3, 2), 1),    # Gram 36x36: Gauss's three-matmul product
    ((3, 3, 12, 40), (4, 4), 2),    # 40 x 48 after the polyphase split
    ((1, 1, 50, 40), (2, 2), 1),    # every matrix real: real Gram and eigvalsh
])
def test_wide_layer_spectra_match_explicit_matrix(shape, n, strides):
    kernel = _random_kernel(shape, np.float32, seed=90)
    # Make one frequency rank deficient: its small singular values come from
    # the SVD fallback, which has to gather from the same (real or complex) parts.
    kernel[..., -1] = kernel[..., -2]
    expected = reference.explicit_singular_values(kernel, n, strides)
    got = tfconvnorm.conv_singular_values(kernel, n, strides)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6 * expected[0])


@pytest.mark.parametrize("channels", [8, 24, 40, 64])  # each squaring schedule of the norm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_operator_norm_bound_schedules_match_explicit_matrix(channels, dtype):
    rng = np.random.default_rng(channels)
    random = rng.standard_normal((3, 3, channels, channels))
    identity = np.zeros((3, 3, channels, channels))
    identity[1, 1] = np.eye(channels)  # every frequency ties: the bounds cannot prune
    kernels = [random, identity, np.zeros_like(random), random * 1e-20]
    norms = tfconvnorm.conv_operator_norm_batch([k.astype(dtype) for k in kernels], (4, 4))
    expected = [reference.explicit_singular_values(k, (4, 4))[0] for k in kernels[:2]]
    rel = 1e-6 if dtype == np.float32 else 1e-10
    assert norms[0].numpy() == pytest.approx(expected[0], rel=rel)
    assert norms[1].numpy() == pytest.approx(1.0, rel=rel)
    assert norms[2].numpy() == 0.0
    assert norms[3].numpy() == pytest.approx(expected[0] * 1e-20, rel=rel)
