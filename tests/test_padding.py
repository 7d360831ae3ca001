"""Zero-padded convolutions: the circular embedding, the bounds it gives, and clipping.

Oracles, none of which uses the embedding or a DFT:
* `reference.explicit_padded_operator_matrix`, built tap by tap from
  TensorFlow's padding rule, itself checked here against `tf.nn.convolution`
  (which computes its own pads for 'SAME' / 'VALID') and Keras' causal Conv1D;
* its singular values, block by block over groups
  (`reference.grouped_singular_values`), for the bounds;
* `reference.explicit_operator_matrix` on N, to check that the layer really is
  a submatrix of the circular operator on the size `circular_embedding` gives,
  and that it is not on the next smaller size.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from tfconvnorm import reference

# (kernel shape, input size, strides, dilation, groups, padding): strides that
# do not divide n, dilation, groups / depthwise, 1-D / 2-D / 3-D, inputs smaller
# than the kernel, 'causal' and explicit pads, 1x1 kernels.
PADDED = [
    ((2, 1, 1), (3,), 1, 1, 1, "same"),          # the [1, -1] example's shape
    ((3, 2, 3), (7,), 2, 1, 1, "same"),
    ((3, 2, 3), (7,), 3, 1, 1, "valid"),
    ((3, 2, 2), (9,), 1, 2, 1, "causal"),
    ((4, 2, 2), (6,), 2, 1, 1, "causal"),
    ((3, 1, 4), (8,), 2, 1, 4, "same"),
    ((3, 3, 2, 3), (5, 5), 1, 1, 1, "same"),
    ((3, 3, 2, 3), (7, 6), 2, 1, 1, "same"),
    ((3, 3, 2, 3), (7, 8), (3, 2), 1, 1, "valid"),
    ((4, 4, 2, 2), (6, 7), 2, 1, 1, "same"),
    ((3, 3, 2, 4), (6, 6), 1, 2, 1, "same"),
    ((3, 2, 2, 4), (7, 5), 2, (2, 1), 1, "same"),  # strides and dilation at once
    ((3, 3, 1, 6), (5, 6), 2, 1, 3, "same"),        # depthwise, multiplier 2
    ((3, 3, 2, 6), (6, 5), 1, 1, 3, "valid"),
    ((5, 5, 2, 2), (2, 3), 1, 1, 1, "same"),        # input smaller than the kernel
    ((3, 3, 2, 2), (5, 4), 1, 1, 1, ((2, 0), (1, 3))),
    ((1, 1, 3, 4), (5, 5), 2, 1, 1, "same"),
    ((1, 1, 3, 4), (5, 5), 1, 1, 1, "valid"),
    ((3, 3, 3, 2, 2), (4, 3, 5), 1, 1, 1, "same"),
    ((2, 3, 2, 2, 4), (5, 4, 3), (2, 1, 2), 1, 2, "valid"),
    ((3, 3, 2, 1, 2), (3, 4, 3), (1, 2, 1), 1, 1, "same"),
]


def _ids(cases):
    return [f"k{c[0]}-n{c[1]}-s{c[2]}-d{c[3]}-g{c[4]}-{c[5]}" for c in cases]


def _kernel(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _layer_spectrum(kernel, n, strides, dilation, groups, padding):
    matrix = reference.explicit_padded_operator_matrix(kernel, n, strides, dilation, groups,
                                                       padding)
    c_in, c_out = kernel.shape[-2] * groups, kernel.shape[-1]
    return reference.grouped_singular_values(matrix, c_out, c_in, groups), matrix


# --- the oracle itself ---------------------------------------------------------


@pytest.mark.parametrize("shape,n,strides,dilation,groups,padding",
                         [c for c in PADDED if isinstance(c[5], str) and c[5] != "causal"],
                         ids=_ids([c for c in PADDED if isinstance(c[5], str)
                                   and c[5] != "causal"]))
def test_reference_padded_matrix_is_what_tensorflow_computes(shape, n, strides, dilation,
                                                              groups, padding):
    """TensorFlow derives the pads of 'SAME' / 'VALID' itself; a wrong pad rule
    in the reference (e.g. the odd pad before, not after) fails here."""
    kernel = _kernel(shape, seed=1)
    rank = len(n)
    matrix = reference.explicit_padded_operator_matrix(kernel, n, strides, dilation, groups,
                                                       padding)
    x = np.random.default_rng(2).standard_normal((3,) + n + (shape[-2] * groups,))
    # TF takes strides or dilation; write dilation out as zeros in the kernel.
    d = (dilation,) * rank if isinstance(dilation, int) else dilation
    dilated = np.zeros(tuple((k - 1) * r + 1 for k, r in zip(shape[:rank], d)) + shape[-2:])
    dilated[tuple(slice(None, None, r) for r in d)] = kernel
    if groups > 1 and rank == 3:  # no grouped Conv3D on the CPU: group by group
        parts = [tf.nn.convolution(xs, ks, strides, padding.upper())
                 for xs, ks in zip(np.split(x, groups, -1), np.split(dilated, groups, -1))]
        y = tf.concat(parts, -1).numpy()
    else:
        y = tf.nn.convolution(x, dilated, strides, padding.upper()).numpy()
    np.testing.assert_allclose(x.reshape(3, -1) @ matrix.T, y.reshape(3, -1), atol=1e-10)


def test_reference_causal_matrix_is_keras_causal_conv1d():
    layer = keras.layers.Conv1D(2, 3, dilation_rate=2, padding="causal", use_bias=False,
                                dtype="float64")
    layer.build((None, 9, 2))
    kernel = layer.kernel.numpy()
    matrix = reference.explicit_padded_operator_matrix(kernel, (9,), 1, 2, 1, "causal")
    np.testing.assert_allclose(matrix, reference.function_matrix(
        lambda x: layer(x).numpy(), (9, 2)), atol=1e-12)


# --- the embedding ---------------------------------------------------------------


def _embedded(kernel, n, size, strides, dilation, groups, padding):
    """The rows and columns of the circular operator on `size` that the layer
    would be (input at offset pad_before, the layer's outputs first), or None
    where the circular operator has too few outputs."""
    rank = len(n)
    pads, out = reference.tensorflow_pads(kernel.shape[:rank], n, strides, dilation, padding)
    s = (strides,) * rank if isinstance(strides, int) else strides
    if any(o > m // t for o, m, t in zip(out, size, s)):
        return None
    circular = reference.explicit_operator_matrix(kernel, size, strides, dilation, groups)
    c_in, c_out = kernel.shape[-2] * groups, kernel.shape[-1]
    out_grid = tuple(m // t for m, t in zip(size, s))
    rows = [np.ravel_multi_index(p, out_grid) * c_out + c
            for p in np.ndindex(*out) for c in range(c_out)]
    cols = [np.ravel_multi_index(tuple((i + b) % m for i, (b, _), m in zip(p, pads, size)),
                                 size) * c_in + c
            for p in np.ndindex(*n) for c in range(c_in)]
    if len(set(cols)) < len(cols):  # two inputs on one circular position
        return None
    return circular[np.ix_(rows, cols)]


@pytest.mark.parametrize("shape,n,strides,dilation,groups,padding", PADDED, ids=_ids(PADDED))
def test_layer_is_a_submatrix_of_the_circular_operator_on_the_smallest_size(
        shape, n, strides, dilation, groups, padding):
    kernel = _kernel(shape, seed=3)
    embedding = tfconvnorm.circular_embedding(shape[:-2], n, strides, dilation, padding)
    pads, out = reference.tensorflow_pads(shape[:-2], n, strides, dilation, padding)
    assert embedding.pads == pads and embedding.output_shape == out
    size = embedding.input_shape
    layer = reference.explicit_padded_operator_matrix(kernel, n, strides, dilation, groups,
                                                      padding)
    np.testing.assert_array_equal(_embedded(kernel, n, size, strides, dilation, groups,
                                            padding), layer)
    # One stride smaller on any axis (still holding the input), and the same
    # construction is no longer the layer.
    s = (strides,) * len(n) if isinstance(strides, int) else strides
    for axis in range(len(n)):
        smaller = list(size)
        smaller[axis] -= s[axis]
        if smaller[axis] < n[axis]:
            continue
        got = _embedded(kernel, n, tuple(smaller), strides, dilation, groups, padding)
        assert got is None or not np.allclose(got, layer), (axis, smaller)


def test_circular_embedding_examples_and_errors():
    # 'same' 3x3 stride 1 on 32: pads (1, 1), so 33; stride 2: pads (0, 1) -> 33 -> 34.
    assert tfconvnorm.circular_embedding((3, 3), (32, 32), 1).input_shape == (33, 33)
    assert tfconvnorm.circular_embedding((3, 3), (32, 32), 2).input_shape == (34, 34)
    assert tfconvnorm.circular_embedding((3,), (58,), padding="valid") == \
        tfconvnorm.CircularEmbedding((58,), (56,), ((0, 0),))
    assert tfconvnorm.circular_embedding((3,), (9,), padding="circular").input_shape == (9,)
    with pytest.raises(ValueError, match="causal.*1-D"):
        tfconvnorm.circular_embedding((3, 3), (8, 8), padding="causal")
    with pytest.raises(ValueError, match="padding must be one of .*padding='full'"):
        tfconvnorm.circular_embedding((3,), (8,), padding="full")
    with pytest.raises(ValueError, match=r"2 \(before, after\) pairs.*padding=\(1, 1\)"):
        tfconvnorm.circular_embedding((3, 3), (8, 8), padding=(1, 1))
    with pytest.raises(ValueError, match="no output.*extent 5"):
        tfconvnorm.circular_embedding((3,), (4,), dilation_rate=2, padding="valid")
    with pytest.raises(ValueError, match=r"strides=\(2,\) do not divide"):
        tfconvnorm.circular_embedding((3,), (7,), 2, padding="circular")


# --- bounds ------------------------------------------------------------------------


def test_the_example_that_circular_norms_do_not_bound():
    """1-D [1, -1], n = 3, 'same': the layer's norm is 2 cos(pi / 7), above the
    circular operator's sqrt(3) at n = 3; the embedding (N = 4) gives 2."""
    kernel = np.array([1.0, -1.0]).reshape(2, 1, 1)
    true = 2 * np.cos(np.pi / 7)
    layer = reference.explicit_padded_operator_matrix(kernel, (3,), padding="same")
    assert np.linalg.norm(layer, 2) == pytest.approx(true, rel=1e-12)
    assert float(tfconvnorm.conv_operator_norm(kernel, 3)) == pytest.approx(np.sqrt(3))
    assert float(tfconvnorm.conv_operator_norm(kernel, 3, padding="same")) == pytest.approx(2.0)
    lower, upper = tfconvnorm.conv_operator_norm_bounds(kernel, 3, padding="same")
    assert float(lower) <= true <= float(upper)
    assert float(lower) == pytest.approx(true, rel=1e-8)  # 3 dimensions: Lanczos is exact


@pytest.mark.parametrize("path", ["lanczos", "explicit"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,n,strides,dilation,groups,padding", PADDED, ids=_ids(PADDED))
def test_padded_spectrum_and_norm_bound_the_layer(shape, n, strides, dilation, groups, padding,
                                                  dtype, path, monkeypatch):
    """`path`: the lower bound by Lanczos (these layers are small enough for the
    explicit route, which is switched off), or both ends from the explicit matrix."""
    if path == "lanczos":
        monkeypatch.setattr(tfconvnorm.spectral.bounds, "EXPLICIT_MAX_COLUMNS", 0)
    kernel = _kernel(shape, seed=4, dtype=dtype)
    expected, _ = _layer_spectrum(kernel, n, strides, dilation, groups, padding)
    got = tfconvnorm.conv_singular_values(kernel, n, strides, dilation, groups, padding)
    assert got.dtype == tf.as_dtype(dtype)
    # Exactly the layer's number of singular values, each bounded from above.
    assert got.shape == expected.shape
    slack = 1e-9 if dtype == np.float64 else 1e-5
    assert np.all(expected <= got.numpy() * (1 + slack) + slack * expected[0])
    norm = float(tfconvnorm.conv_operator_norm(kernel, n, strides, dilation, groups, padding))
    assert norm == pytest.approx(float(got[0]), rel=1e-5)
    assert expected[0] <= norm * (1 + slack)
    # The certified interval holds as computed, with no allowance.
    lower, upper = tfconvnorm.conv_operator_norm_bounds(kernel, n, strides, dilation, groups,
                                                        padding)
    assert lower.dtype == upper.dtype == tf.float64
    assert float(lower) <= expected[0] <= float(upper)
    if path == "lanczos":
        assert float(upper) == pytest.approx(norm, rel=1e-5)
        # A lower bound that works (not merely a small number): Lanczos on these
        # few hundred dimensions gets within 1% (the benchmark reports tightness).
        assert float(lower) >= 0.99 * expected[0]
    else:  # the exact norm, widened by the rounding allowance only
        assert float(upper) - float(lower) <= 1e-8 * expected[0]


def test_bounds_many_matches_one_by_one_and_checks_arguments():
    cases = PADDED[6:10]
    kernels = [_kernel(c[0], seed=5 + i) for i, c in enumerate(cases)]
    geometries = [dict(input_shape=c[1], strides=c[2], dilation_rate=c[3], groups=c[4],
                       padding=c[5]) for c in cases]
    many = tfconvnorm.conv_operator_norm_bounds_many(kernels, geometries, iterations=8)
    for kernel, geometry, bounds in zip(kernels, geometries, many):
        true = _layer_spectrum(kernel, geometry["input_shape"], geometry["strides"],
                               geometry["dilation_rate"], geometry["groups"],
                               geometry["padding"])[0][0]
        assert float(bounds.lower) <= true <= float(bounds.upper)
    # No iterations: a random vector, still a lower bound.
    (zero,) = tfconvnorm.conv_operator_norm_bounds_many(kernels[:1], geometries[:1],
                                                        iterations=0)
    assert 0 < float(zero.lower) <= float(many[0].lower)
    with pytest.raises(ValueError, match="iterations=-1"):
        tfconvnorm.conv_operator_norm_bounds(kernels[0], (5, 5), iterations=-1)
    with pytest.raises(TypeError, match="kernels must be a list"):
        tfconvnorm.conv_operator_norm_bounds_many(kernels[0], geometries[:1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN"):
        tfconvnorm.conv_operator_norm_bounds(np.full((3, 3, 1, 1), np.nan), (5, 5), padding="same")
    zero_kernel = tfconvnorm.conv_operator_norm_bounds(np.zeros((3, 3, 2, 2)), 5, padding="same")
    assert float(zero_kernel.lower) == float(zero_kernel.upper) == 0.0


def test_circular_and_dense_bounds_are_the_exact_norm():
    kernel = _kernel((3, 3, 2, 3), seed=6)
    exact = np.linalg.norm(reference.explicit_operator_matrix(kernel, (6, 6), 2), 2)
    lower, upper = tfconvnorm.conv_operator_norm_bounds(kernel, (6, 6), 2)
    assert float(lower) <= exact <= float(upper)
    assert float(upper) - float(lower) <= 1e-8 * exact
    matrix = _kernel((5, 4), seed=7)
    lower, upper = tfconvnorm.conv_operator_norm_bounds(matrix, (), padding="same")
    assert float(lower) <= np.linalg.norm(matrix, 2) <= float(upper)


# --- clipping the real layer -------------------------------------------------------------


@pytest.mark.parametrize("method", ["alternating", "exact", "rescale"])
@pytest.mark.parametrize("shape,n,strides,dilation,groups,padding",
                         PADDED[1:4] + PADDED[6:14] + PADDED[15:17] + PADDED[19:20],
                         ids=_ids(PADDED[1:4] + PADDED[6:14] + PADDED[15:17] + PADDED[19:20]))
def test_clip_guarantees_the_real_layers_norm(shape, n, strides, dilation, groups, padding,
                                              method):
    kernel = _kernel(shape, seed=8)
    true = _layer_spectrum(kernel, n, strides, dilation, groups, padding)[0][0]
    bound = 0.4 * true
    clipped = tfconvnorm.clip_conv_singular_values(kernel, n, bound, strides, dilation, groups,
                                                   method=method, padding=padding).numpy()
    after = _layer_spectrum(clipped, n, strides, dilation, groups, padding)[0][0]
    assert after <= bound * (1 + 1e-4)
    # It is a projection, not a collapse: the result keeps most of what fits.
    assert np.linalg.norm(clipped) > 0.2 * np.linalg.norm(kernel)
    if method == "rescale":  # one factor, landing on the bound of the embedding
        upper = float(tfconvnorm.conv_operator_norm(kernel, n, strides, dilation, groups,
                                                    padding))
        np.testing.assert_allclose(clipped, kernel * bound / upper, rtol=1e-9)
        again = tfconvnorm.clip_conv_singular_values(clipped, n, bound, strides, dilation,
                                                     groups, method=method, padding=padding)
        np.testing.assert_array_equal(again.numpy(), clipped)  # idempotent
    # Inside the ball of the bounding operator: returned unchanged.
    upper = float(tfconvnorm.conv_operator_norm(kernel, n, strides, dilation, groups, padding))
    same = tfconvnorm.clip_conv_singular_values(kernel, n, 1.01 * upper, strides, dilation,
                                                groups, method=method, padding=padding)
    np.testing.assert_array_equal(same.numpy(), kernel)


def test_clip_paper_method_on_padded_layer_is_the_published_clip_on_n():
    """'paper' with a padding is the single clip on the circular operator on N."""
    kernel = _kernel((3, 3, 2, 3), seed=9)
    size = tfconvnorm.circular_embedding((3, 3), (7, 7), padding="same").input_shape
    got = tfconvnorm.clip_conv_singular_values(kernel, (7, 7), 1.0, method="paper",
                                               padding="same")
    np.testing.assert_allclose(got.numpy(), reference.published_clip(kernel, size, 1.0),
                               rtol=1e-9, atol=1e-12)


def test_exact_method_needs_an_embedding_as_large_as_the_kernel():
    with pytest.raises(ValueError, match=r"circular embedding size \(2, 2\) of input_shape="
                                         r"\(1, 1\).*dilated kernel \(3, 3\)"):
        tfconvnorm.clip_conv_singular_values(np.ones((3, 3, 1, 1)), (1, 1), 0.5,
                                             method="exact", padding="same")


# The whole grid the float64 / one-channel-per-group bug lived in: every dtype and
# method on geometries with 1-wide per-frequency matrices (one input channel per
# group, one output channel), groups, strides and padding.
CLIP_GRID = [
    ((3, 3, 1, 8), (4, 4), 1, 1, 4, "circular"),
    ((3, 3, 1, 8), (5, 5), 1, 1, 4, "same"),
    ((3, 3, 1, 4), (6, 6), 1, 1, 4, "valid"),
    ((3, 3, 2, 1), (6, 6), 1, 1, 1, "circular"),
    ((3, 1, 3), (7,), 2, 1, 3, "same"),
    ((3, 3, 2, 6), (6, 6), 2, 1, 3, "circular"),
]


@pytest.mark.parametrize("method", tfconvnorm.METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,n,strides,dilation,groups,padding", CLIP_GRID,
                         ids=_ids(CLIP_GRID))
def test_every_method_and_dtype_clips(shape, n, strides, dilation, groups, padding, dtype,
                                      method):
    kernel = _kernel(shape, seed=10, dtype=dtype)
    if padding == "circular":
        matrix = reference.explicit_operator_matrix(kernel, n, strides, dilation, groups)
    else:
        matrix = reference.explicit_padded_operator_matrix(kernel, n, strides, dilation, groups,
                                                           padding)
    bound = 0.5 * np.linalg.norm(matrix, 2)
    clipped = tfconvnorm.clip_conv_singular_values(kernel, n, bound, strides, dilation, groups,
                                                   method=method, padding=padding)
    assert clipped.dtype == tf.as_dtype(dtype) and np.all(np.isfinite(clipped.numpy()))
    if padding == "circular":
        after = reference.explicit_operator_matrix(clipped.numpy(), n, strides, dilation, groups)
    else:
        after = reference.explicit_padded_operator_matrix(clipped.numpy(), n, strides, dilation,
                                                          groups, padding)
    limit = bound * (1 + 1e-4) if method != "paper" else bound * 1.5
    assert np.linalg.norm(after, 2) <= limit


@pytest.mark.parametrize("shape,n,strides,dilation,groups,padding",
                         PADDED + [((3, 3, 2, 4), (6, 6), 2, 1, 2, "circular"),
                                   ((3, 1, 4), (8,), 2, 2, 4, "circular")],
                         ids=_ids(PADDED) + ["circular-grouped", "circular-depthwise-1d"])
def test_apply_convolution_is_the_layer(shape, n, strides, dilation, groups, padding):
    """The operator the lower bounds iterate on, and its autodiff adjoint, against
    the tap-by-tap matrix: depthwise, group-by-group, strided-and-dilated (a
    subsampled stride-1 output) and circular paths."""
    from tfconvnorm.spectral import operator  # pylint: disable=import-outside-toplevel
    kernel = _kernel(shape, seed=11)
    g = operator.Geometry(tf.TensorShape(shape), n, strides, dilation, groups, padding)
    if padding == "circular":
        matrix = reference.explicit_operator_matrix(kernel, n, strides, dilation, groups)
    else:
        matrix = reference.explicit_padded_operator_matrix(kernel, n, strides, dilation, groups,
                                                           padding)
    columns = matrix.shape[1]
    basis = tf.reshape(tf.eye(columns, dtype=tf.float64), (columns,) + n + (shape[-2] * groups,))
    y = tfconvnorm.spectral.apply_convolution(basis, tf.constant(kernel), g)
    np.testing.assert_allclose(tf.reshape(y, (columns, -1)).numpy().T, matrix, atol=1e-12)
    # The gradient is the exact adjoint: d<A x, u>/dx = A^T u.
    rng = np.random.default_rng(12)
    x = tf.constant(rng.standard_normal((1,) + n + (shape[-2] * groups,)))
    u = rng.standard_normal(matrix.shape[0])

    @tf.function  # as the bounds use it: TF's eager Conv3D gradient is broken on oneDNN
    def adjoint(x, u):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tfconvnorm.spectral.apply_convolution(x, tf.constant(kernel), g)
        return tape.gradient(y, x, output_gradients=tf.reshape(u, tf.shape(y)))

    np.testing.assert_allclose(adjoint(x, tf.constant(u)).numpy().reshape(-1), matrix.T @ u,
                               atol=1e-10)


def test_bounds_traced_inside_a_function_then_eagerly():
    """The compiled helpers are cached per geometry; one first built inside another
    tf.function's graph must still work outside it (both routes)."""
    for shape, n in (((3, 3, 1, 4), (3, 3)), ((3, 3, 8, 8), (9, 9))):  # explicit, Lanczos
        kernel = tf.constant(_kernel(shape, seed=13, dtype=np.float32))
        groups = 4 if shape[-2] == 1 else 1

        def bounds(kernel=kernel, n=n, groups=groups):
            return tfconvnorm.conv_operator_norm_bounds(kernel, n, groups=groups,
                                                        padding="same")

        inside = tf.function(bounds)()
        outside = bounds()
        assert float(inside.lower) == pytest.approx(float(outside.lower), rel=1e-6)
        assert float(inside.upper) == pytest.approx(float(outside.upper), rel=1e-9)
