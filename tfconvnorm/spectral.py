"""Exact spectra of convolution operators, and projections onto operator-norm balls.

A circular (wrap-around) convolution is block circulant, so the DFT
block-diagonalises it (Sedghi, Gupta & Long, ICLR 2019): its singular values
are those of the small matrices P(w) obtained by transforming the kernel at
every frequency w. This module generalises that to what real layers do:

* strides: a stride-s convolution is a stride-1 convolution of the s^d
  polyphase components of its input (space-to-depth), so P(w) is
  `c_out x (s^d * c_in)` on the (n/s)^d output frequencies; exact, where the
  published code ignores strides;
* dilation, and inputs smaller than the (dilated) kernel: taps land at
  `t * dilation mod n`, so taps that wrap around add up (fold) - NumPy's
  `fft2(kernel, n)` would silently crop them instead;
* groups / depthwise: the operator is block diagonal over groups, so every
  group is its own small matrix;
* 1-D, 2-D, 3-D, and rank-2 kernels with `input_shape=()` (Dense layers).

Structure used because it is exact: real kernels have P(-w) = conj(P(w)), so
only half of the frequencies are decomposed (the rest are counted twice);
kernels whose taps all fall inside one stride (1x1 convs, 2x2 stride-2
"patchify" convs) have the same matrix at every frequency, so one
decomposition serves all.

The per-frequency transform is a product of small per-axis DFT matrices
rather than a zero-padded FFT: it folds wrapped taps, handles dilation and
the polyphase split in one step, and costs O(n k) per axis, which for conv
kernels (k << n) is cheaper than O(n log n). The per-axis factors are
combined into one real matrix, so a transform is a single matmul (one
contraction per axis for very large 3-D inputs).

Whole networks: the `*_many` functions take kernels of any geometries; those
of one geometry are stacked (one grouped convolution), and the matrices of
every layer that share a size go through one decomposition op. On networks
of small layers, op launches otherwise cost more than the arithmetic.

Decompositions, and where they run: singular values of float32 kernels come
from `tf.linalg.eigvalsh` of the per-frequency Gram matrices in complex128
(real float64 where every matrix is real: 1x1 convs, Dense); eigvalsh has
CPU and GPU kernels. The few matrices whose condition number would make
that inaccurate for small singular values are redone with `tf.linalg.svd`.
float64 kernels use `tf.linalg.svd` throughout, for full relative accuracy.
TensorFlow has no GPU kernel for complex SVD, so those SVDs run on the CPU
even inside a GPU program. Operator norms and projections use `eigvalsh` /
`eigh` and matmuls only, so they run wholly on a GPU. Complex products are
done as real matmuls (TF's complex64 kernels are several times slower).

Everything here is pure TensorFlow: graph-safe (`tf.function` with static
kernel shapes), dtype-preserving, and free of Keras.
"""

import functools
import math

import numpy as np
import tensorflow as tf

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "conv_transfer_matrices",
    "conv_singular_values",
    "conv_operator_norm",
    "clip_conv_singular_values",
    "conv_singular_values_batch",
    "conv_operator_norm_batch",
    "clip_conv_singular_values_batch",
    "conv_singular_values_many",
    "conv_operator_norm_many",
    "clip_conv_singular_values_many",
]

#: Projection methods accepted by `clip_conv_singular_values`.
METHODS = ("alternating", "paper", "exact")
#: The default method: the only cheap one that guarantees the bound.
DEFAULT_METHOD = "alternating"
#: Alternating-projection rounds before the final rescale. More rounds move
#: the result closer to the Euclidean projection (less shrinkage from the
#: rescale); the bound holds for any number.
DEFAULT_ALTERNATING_ITERATIONS = 4
#: Dykstra iterations cap and stopping tolerance (relative change of the
#: kernel between iterations) for method="exact".
DEFAULT_EXACT_MAX_ITERATIONS = 500
DEFAULT_EXACT_TOLERANCE = 1e-7
#: A float32 Gram eigenvalue below this fraction of the largest one is
#: recomputed by SVD: the complex128 Gram loses about eps64 * lambda_max, so
#: above this threshold a singular value keeps ~1e-7 relative accuracy.
_GRAM_CONDITION_THRESHOLD = 1e-8

#: Squarings of the Gram matrix behind the cheap per-frequency bounds that
#: pick the candidates for the largest singular value, by matrix size
#: (size limit, squarings, first squaring after which to prune). After j
#: squarings the upper bound is within a factor size^(1/2^j) of the truth:
#: too loose to prune anything before the first pruning stage (measured on
#: ResNet-32: 64x64 matrices, 98% survive 2 squarings, 15% survive 3), and
#: the exact complex128 decomposition of each remaining candidate costs more
#: than the last squarings of the few survivors (64x64: 46 candidates after 3
#: squarings, 11 ms of eigvalsh; 10 after 5).
_GRAM_SQUARINGS = ((16, 3, 1), (32, 4, 2), (None, 5, 3))
#: Largest (frequencies * phases * taps) for which the per-axis DFT factors
#: are combined into one matrix (`_combined_factors`, 2 * 8 bytes per entry
#: in float64); beyond it, one contraction per axis.
_COMBINED_FACTOR_MAX_ENTRIES = 1 << 21
#: Squarings between renormalisations of the powers: with trace 1, the top
#: eigenvalue is >= 1/size (>= 1/64 where bounds are used), and after 3
#: squarings its square (64^-16, in the Frobenius norm) is still above
#: float32's smallest normal number.
_RENORMALISE_EVERY = {tf.float32: 3, tf.float64: 6}
#: Up to this Gram size TF's complex128 matmul beats Gauss's three float64
#: matmuls (`_gram`); above it, not (measured on a 2-core CPU).
_NATIVE_COMPLEX_GRAM_MAX_SIZE = 32
#: Relative rounding allowance on those bounds, so that no candidate is lost.
_BOUND_SLACK = {tf.float32: 1e-4, tf.float64: 1e-10}
#: Above this matrix size the squarings cost more than a working-precision
#: eigvalsh of every matrix (measured on a 2-core CPU: 16 and 64 favour the
#: bounds, 128 and 256 eigvalsh), which screens instead.
_GRAM_BOUNDS_MAX_SIZE = 64
#: Allowance on the screening eigenvalues: complex64 eigvalsh is backward
#: stable, so its largest eigenvalue is within ~size * 6e-8 (relative).
_SCREEN_SLACK = {tf.float32: 1e-3, tf.float64: 1e-10}
#: A kernel whose norm exceeds the bound by less than this (relative) counts
#: as inside: the rescale lands on the bound up to rounding, and projecting
#: our own output again must return it unchanged.
_INSIDE_RTOL = {tf.float32: 1e-6, tf.float64: 1e-12}


# ---------------------------------------------------------------------------
# Argument checking and geometry.


def _int_tuple(value, rank, name):
    """An int or a sequence of `rank` positive ints, as a tuple."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        items = (int(value),) * rank
    else:
        try:
            items = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a sequence of {rank} ints, "
                             f"got {name}={value!r}") from None
        if len(items) != rank:
            raise ValueError(f"{name} must have {rank} entries (one per spatial axis of "
                             f"the kernel), got {name}={value!r}")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                raise ValueError(f"{name} must hold ints, got {name}={value!r}")
        items = tuple(int(v) for v in items)
    for item in items:
        if item <= 0:
            raise ValueError(f"{name} must be positive, got {name}={value!r}")
    return items


class _Geometry:
    """Validated geometry of one convolution and its per-axis DFT factors."""

    def __init__(self, kernel_shape, input_shape, strides, dilation_rate, groups):
        if kernel_shape.rank is None or not kernel_shape.is_fully_defined():
            raise ValueError(f"kernel needs a static, fully defined shape, got {kernel_shape}")
        kernel_shape = tuple(int(d) for d in kernel_shape)
        if len(kernel_shape) < 2:
            raise ValueError("kernel must have shape (*spatial, c_in // groups, c_out), "
                             f"got shape {kernel_shape}")
        if any(d == 0 for d in kernel_shape):
            raise ValueError(f"kernel has an empty axis: shape {kernel_shape}")
        rank = len(kernel_shape) - 2
        if isinstance(input_shape, (int, np.integer)) and not isinstance(input_shape, bool):
            if rank == 0:
                raise ValueError("a rank-2 kernel (a matrix) takes input_shape=(), "
                                 f"got input_shape={input_shape!r}")
        elif input_shape is None or len(tuple(input_shape)) != rank:
            raise ValueError(
                f"kernel of shape {kernel_shape} has {rank} spatial axes, so input_shape "
                f"must give {rank} spatial sizes (channels excluded), got "
                f"input_shape={input_shape!r}")
        self.rank = rank
        self.kernel_size = kernel_shape[:rank]
        self.input_shape = _int_tuple(input_shape, rank, "input_shape")
        self.strides = _int_tuple(strides, rank, "strides")
        self.dilation_rate = _int_tuple(dilation_rate, rank, "dilation_rate")
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups <= 0:
            raise ValueError(f"groups must be a positive int, got groups={groups!r}")
        self.groups = int(groups)
        for n, s in zip(self.input_shape, self.strides):
            if n % s:
                raise ValueError(
                    f"strides={self.strides} do not divide input_shape={self.input_shape}: "
                    f"the circular operator needs each stride to divide its input size "
                    f"({s} does not divide {n})")
        self.c_in_group, self.c_out = kernel_shape[-2:]
        if self.c_out % self.groups:
            raise ValueError(f"kernel has c_out={self.c_out} output channels, not divisible "
                             f"by groups={self.groups}")
        self.c_out_group = self.c_out // self.groups
        self.c_in = self.c_in_group * self.groups
        self.out_shape = tuple(n // s for n, s in zip(self.input_shape, self.strides))
        self.phases = int(np.prod(self.strides, dtype=np.int64))
        self.rows = self.c_out_group
        self.cols = self.phases * self.c_in_group
        # Along an axis whose taps all fall inside one stride (1x1 convs,
        # 2x2 stride-2 convs), P(w) does not depend on that axis' frequency.
        constant = [(k - 1) * r < s for k, r, s in
                    zip(self.kernel_size, self.dilation_rate, self.strides)]
        # Conjugate symmetry halves one non-constant axis.
        varying = [axis for axis in range(rank) if not constant[axis]]
        half_axis = varying[-1] if varying else None
        keys = tuple(
            (k, n, s, r, axis == half_axis, constant[axis])
            for axis, (k, n, s, r) in enumerate(
                zip(self.kernel_size, self.input_shape, self.strides, self.dilation_rate)))
        self.factors = [_axis_factors(*key) for key in keys]
        self.folded = any(f.folded for f in self.factors)
        #: True when every per-frequency matrix is real: each axis has one
        #: frequency (0), as for 1x1 convs and Dense layers.
        self.real = all(constant)
        self.freq_shape = tuple(f.forward.shape[0] for f in self.factors)
        self.num_frequencies = int(np.prod(self.freq_shape, dtype=np.int64))
        weights = np.ones((), dtype=np.int64)
        for f in self.factors:
            weights = np.multiply.outer(weights, f.weights)
        #: How many of the full spectrum's frequencies each computed one stands for.
        self.weights = weights.reshape(-1)
        self.taps = int(np.prod(self.kernel_size, dtype=np.int64))
        #: All axes' factors as one (frequencies, phases, taps) pair, or None
        #: where that would be too big (large 3-D inputs).
        self.combined = (
            _combined_factors(keys)
            if self.num_frequencies * self.phases * self.taps <= _COMBINED_FACTOR_MAX_ENTRIES
            else None)


class _AxisFactors:
    def __init__(self, forward, inverse, weights, folded):
        self.forward = forward  # (freqs, stride, k): kernel taps -> P(w)
        self.inverse = inverse  # (freqs, stride, k): P(w) -> least-squares taps
        self.weights = weights  # (freqs,): frequencies each one stands for
        self.folded = folded    # True if two taps share a circular position


@functools.lru_cache(maxsize=512)
def _axis_factors(k, n, s, r, half, constant):
    """The DFT of one spatial axis, from kernel taps to frequencies and back.

    Tap t sits at input offset t*r = a*s + phase; on the (n/s)-point output
    grid it contributes exp(-2 pi i w a / m) to polyphase component `phase`.
    The inverse is the least-squares (pseudo-inverse) map: the adjoint
    divided by m and by how many taps share each circular position.
    """
    m = n // s
    offsets = np.arange(k) * r
    phase, shift = offsets % s, offsets // s
    if constant:
        freqs, weights = np.zeros(1, np.int64), np.array([m])
    elif half:
        freqs = np.arange(m // 2 + 1)
        weights = np.where((freqs == 0) | (2 * freqs == m), 1, 2)
    else:
        freqs, weights = np.arange(m), np.ones(m, np.int64)
    forward = np.zeros((len(freqs), s, k), np.complex128)
    forward[:, phase, np.arange(k)] = np.exp(-2j * np.pi * np.outer(freqs, shift) / m)
    positions = offsets % n
    multiplicity = np.array([np.sum(positions == p) for p in positions])
    inverse = (weights[:, None, None] * np.conj(forward)) / (m * multiplicity)[None, None, :]
    return _AxisFactors(forward, inverse, weights.astype(np.int64), bool(multiplicity.max() > 1))


@functools.lru_cache(maxsize=256)
def _combined_factors(keys):
    """The per-axis factors of `keys` (one `_axis_factors` key per axis) as one
    transform: (forward, inverse), real arrays of shapes (2 * F * P, taps) and
    (taps, 2 * F * P), F frequencies and P phases in row-major axis order.

    Real and imaginary parts are stacked so that a single real matmul does a
    whole transform: one op instead of a few dozen, which on small kernels
    is most of the cost (ResNet-32: 33 ms -> see BENCHMARKS.md).
    """
    forward, inverse = np.ones((1, 1, 1)), np.ones((1, 1, 1))
    for key in keys:
        f = _axis_factors(*key)
        def outer(a, b):
            (w, s, k), (x, t, l) = a.shape, b.shape
            return np.einsum("ask,btl->abstkl", a, b).reshape(w * x, s * t, k * l)
        forward, inverse = outer(forward, f.forward), outer(inverse, f.inverse)
    taps = forward.shape[-1]
    forward = forward.reshape(-1, taps)
    inverse = inverse.reshape(-1, taps).T
    # Re(inverse @ M) = inverse.real @ M.real - inverse.imag @ M.imag.
    return (np.concatenate([forward.real, forward.imag], axis=0),
            np.concatenate([inverse.real, -inverse.imag], axis=1))


def _tiny(dtype):
    return tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)


def _prepare_kernel(kernel, name="kernel"):
    """Kernel as a float tensor, with a finiteness check that also runs in graphs."""
    kernel = tf.convert_to_tensor(kernel)
    if kernel.dtype.is_complex or kernel.dtype == tf.bool or kernel.dtype == tf.string:
        raise TypeError(f"{name} must be real floating point, got dtype {kernel.dtype.name}")
    if kernel.dtype.is_integer:
        kernel = tf.cast(kernel, tf.float32)
    kernel = tf.debugging.assert_all_finite(
        kernel, f"{name} has NaN or Inf entries; refusing to compute a spectrum of it")
    return kernel


def _work_dtypes(dtype):
    """(real, complex) dtypes to compute in. Half types compute in float32."""
    if dtype == tf.float64:
        return tf.float64, tf.complex128
    return tf.float32, tf.complex64


# ---------------------------------------------------------------------------
# Kernel <-> per-frequency matrices.


# Internally every per-frequency matrix is stored transposed, P(w)^T, of shape
# (phases * c_in / groups, c_out / groups): that is the order in which the
# kernel's own axes come out of the transform, so no transpose pass over the
# batch is needed (for groups == 1), and the singular values, the Gram
# eigenvalues and the clipping are the same for P^T as for P.


def _forward(kernel, geometry, complex_dtype):
    """Per-frequency matrices P(w)^T, shape (frequencies, groups, cols, rows)."""
    return tf.complex(*_forward_parts(kernel, geometry, complex_dtype.real_dtype))


def _forward_parts(kernel, geometry, real_dtype):
    """Real and imaginary parts of `_forward`'s matrices.

    Works on real and imaginary parts separately: a real kernel needs half
    the products, TF's real matmuls are several times faster than complex
    ones, and the operator norm goes on in real arithmetic (`_gram_parts`).
    """
    g = geometry
    shape = (g.num_frequencies, g.groups, g.cols, g.rows)
    if g.combined is not None:
        x = tf.reshape(tf.cast(kernel, real_dtype), (g.taps, g.c_in_group, g.groups,
                                                     g.c_out_group))
        if g.groups > 1:  # groups first: a transpose of the kernel, not of the output
            x = tf.transpose(x, [0, 2, 1, 3])
        x = tf.matmul(tf.constant(g.combined[0], real_dtype), tf.reshape(x, (g.taps, -1)))
        x = tf.reshape(x, (2, g.num_frequencies, g.phases, g.groups, g.c_in_group,
                           g.c_out_group))
        if g.groups > 1 and g.phases > 1:
            x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
        x = tf.reshape(x, (2,) + shape)
        return x[0], x[1]
    real = tf.reshape(tf.cast(kernel, real_dtype), g.kernel_size + (g.c_in_group * g.c_out,))
    imag = tf.zeros_like(real)
    for f in g.factors:
        # Contract the leading tap axis; (freq, phase) axes are appended.
        f_re = tf.constant(f.forward.real, real_dtype)
        f_im = tf.constant(f.forward.imag, real_dtype)
        dot = functools.partial(tf.tensordot, axes=[[0], [2]])
        real, imag = dot(real, f_re) - dot(imag, f_im), dot(real, f_im) + dot(imag, f_re)
    d = g.rank
    freq_axes = [3 + 2 * j for j in range(d)]
    phase_axes = [4 + 2 * j for j in range(d)]

    def arrange(x):  # (c_in_group * c_out, w_1, phase_1, ..., w_d, phase_d) -> matrices
        x = tf.reshape(x, (g.c_in_group, g.groups, g.c_out_group)
                       + sum(((w, s) for w, s in zip(g.freq_shape, g.strides)), ()))
        x = tf.transpose(x, freq_axes + [1] + phase_axes + [0, 2])
        return tf.reshape(x, shape)

    return arrange(real), arrange(imag)


def _inverse(matrices, geometry, real_dtype):
    """Least-squares kernel (same support) of conjugate-symmetric per-frequency
    matrices (in `_forward`'s layout)."""
    g = geometry
    complex_dtype = matrices.dtype
    if g.combined is not None:
        x = tf.reshape(matrices, (g.num_frequencies, g.groups, g.phases, g.c_in_group,
                                  g.c_out_group))
        if g.groups > 1 and g.phases > 1:
            x = tf.transpose(x, [0, 2, 1, 3, 4])
        x = tf.reshape(x, (g.num_frequencies * g.phases, g.c_in_group * g.c_out))
        x = tf.concat([tf.math.real(x), tf.math.imag(x)], axis=0)
        x = tf.matmul(tf.constant(g.combined[1], x.dtype), x)
        x = tf.reshape(x, (g.taps, g.groups, g.c_in_group, g.c_out_group))
        if g.groups > 1:
            x = tf.transpose(x, [0, 2, 1, 3])
        return tf.cast(tf.reshape(x, g.kernel_size + (g.c_in_group, g.c_out)), real_dtype)
    d = g.rank
    x = tf.reshape(matrices, g.freq_shape + (g.groups,) + g.strides
                   + (g.c_in_group, g.c_out_group))
    # -> (c_in_group, groups, c_out_group, w_1, phase_1, ..., w_d, phase_d)
    perm = [2 * d + 1, d, 2 * d + 2] + sum(([j, d + 1 + j] for j in range(d)), [])
    x = tf.transpose(x, perm)
    x = tf.reshape(x, (g.c_in_group * g.c_out,)
                   + sum(((w, s) for w, s in zip(g.freq_shape, g.strides)), ()))
    for f in g.factors:
        # Contract the (freq, phase) pair after the channel axis; tap axis appended.
        x = tf.tensordot(x, tf.constant(f.inverse, complex_dtype), axes=[[1, 2], [0, 1]])
    # x: (c_in_group * c_out, k_1, ..., k_d); the imaginary part is rounding.
    x = tf.math.real(x)
    x = tf.transpose(x, list(range(1, d + 1)) + [0])
    return tf.cast(tf.reshape(x, g.kernel_size + (g.c_in_group, g.c_out)), real_dtype)


# ---------------------------------------------------------------------------
# Per-matrix linear algebra.


def _frobenius(x, axis=(-2, -1)):
    """sqrt(sum |x|^2) over `axis`: the one singular value of a row or column,
    and for a Gram matrix an upper bound on its largest eigenvalue."""
    return tf.sqrt(tf.reduce_sum(tf.math.square(tf.abs(x)), axis=axis))


def _frobenius_parts(real, imag, axis=(-2, -1)):
    """`_frobenius` of real + i imag, without forming the complex tensor."""
    return tf.sqrt(tf.reduce_sum(tf.square(real) + tf.square(imag), axis=axis))


def _gram_parts(real, imag):
    """Real and imaginary parts of the smaller Gram matrix of P = real + i imag:
    P P^H or P^H P.

    Four real matmuls instead of one complex one: TF's real kernels are
    several times faster than its complex ones, and the transposes ride
    inside the matmuls (no concat or transpose pass over the batch).
    (Gauss's three-matmul trick measured no faster here.)
    """
    rows, cols = real.shape[-2:]
    if rows <= cols:  # P P^H
        mm = functools.partial(tf.matmul, transpose_b=True)
        return mm(real, real) + mm(imag, imag), mm(imag, real) - mm(real, imag)
    mm = functools.partial(tf.matmul, transpose_a=True)  # P^H P
    return mm(real, real) + mm(imag, imag), mm(real, imag) - mm(imag, real)


def _hermitian_square(real, imag):
    """Parts of H^2 for Hermitian H = real + i imag."""
    return (tf.matmul(real, real) - tf.matmul(imag, imag),
            tf.matmul(real, imag) + tf.matmul(imag, real))


def _gram(real, imag=None):
    """The smaller Gram matrix, P P^H or P^H P, of P = real + i imag (imag
    None: a real P, real Gram matrix), as one tensor.

    complex64 goes through `_gram_parts`. For complex128, TF's complex matmul
    wins on small matrices; above `_NATIVE_COMPLEX_GRAM_MAX_SIZE` it is only
    as fast as four float64 matmuls, and Gauss's trick needs three
    (`_gram_gauss`). The Gram matrix is most of the cost of a full spectrum
    of wide layers (ResNet50V2's 512-channel convs: 480 -> 360 ms per 28
    matrices).
    """
    rows, cols = real.shape[-2:]
    if imag is None:
        return tf.matmul(real, real, transpose_b=rows <= cols, transpose_a=rows > cols)
    if real.dtype != tf.float64:
        return tf.complex(*_gram_parts(real, imag))
    if min(rows, cols) <= _NATIVE_COMPLEX_GRAM_MAX_SIZE:
        matrices = tf.complex(real, imag)
        return tf.matmul(matrices, matrices, adjoint_b=rows <= cols, adjoint_a=rows > cols)
    return _gram_gauss(real, imag)


def _gram_gauss(real, imag):
    """`_gram` of real + i imag in three real matmuls, complex. With
    P^H P = (R^T R + I^T I) + i (R^T I - I^T R):
    R^T I - I^T R = (R - I)^T (R + I) - R^T R + I^T I (P P^H likewise)."""
    rows, cols = real.shape[-2:]
    if rows <= cols:
        mm = functools.partial(tf.matmul, transpose_b=True)
        mixed = mm(real + imag, real - imag)
    else:
        mm = functools.partial(tf.matmul, transpose_a=True)
        mixed = mm(real - imag, real + imag)
    squares_real, squares_imag = mm(real, real), mm(imag, imag)
    return tf.complex(squares_real + squares_imag, mixed - squares_real + squares_imag)


def _matrix_singular_values(real, imag, use_svd):
    """Singular values of each matrix real + i imag (imag None: real
    matrices), float64 parts of shape (batch, rows, cols); ascending, float64."""
    rows, cols = real.shape[-2:]

    def whole(index=None):  # the matrices (or those at `index`) as one tensor
        pick = (lambda x: x) if index is None else functools.partial(tf.gather_nd, indices=index)
        return pick(real) if imag is None else tf.complex(pick(real), pick(imag))

    if min(rows, cols) == 1:
        return _frobenius(whole(), -1 if rows == 1 else -2)
    if use_svd:
        return tf.reverse(tf.linalg.svd(whole(), compute_uv=False), axis=[-1])
    eigenvalues = tf.math.real(tf.linalg.eigvalsh(_gram(real, imag)))
    values = tf.sqrt(tf.maximum(eigenvalues, 0.0))
    # Ill-conditioned matrices (and exactly singular ones) lose their small
    # singular values in the Gram matrix; redo just those with an SVD.
    lam_max = eigenvalues[..., -1:]
    poor = tf.where(eigenvalues[..., 0] <= _GRAM_CONDITION_THRESHOLD * lam_max[..., 0])
    redone = tf.reverse(tf.linalg.svd(whole(poor), compute_uv=False), axis=[-1])
    return tf.tensor_scatter_nd_update(values, poor, redone)


def _safe_scale(scale):
    """Per-operator max |entry| as a divisor that keeps squares in range: 1
    where an operator is all zeros."""
    return tf.where(scale > 0, scale, tf.ones_like(scale))


def _top_eigenvalues(real, imag, indices):
    """Exact largest eigenvalue of the Gram matrix of each matrix `indices`
    points at, in complex128 (differentiable)."""
    chosen = [tf.cast(tf.gather(x, indices), tf.float64) for x in (real, imag)]
    return tf.math.real(tf.linalg.eigvalsh(_gram(*chosen)))[:, -1]


def _largest_singular_values(real, imag, segment, count):
    """The largest singular value of each of `count` operators, exactly.

    `real` and `imag` (the parts of the matrices) have shape (batch, rows,
    cols); matrix j belongs to operator `segment[j]`. Entries must be of
    moderate size (the callers scale kernels to max |entry| 1): Gram
    matrices are formed in the working precision.

    Decomposing every frequency is wasteful when only the maximum matters.
    Gram iteration gives upper bounds ||G^(2^j)||_F^(1/2^j) on each matrix's
    largest eigenvalue, within a factor size^(1/2^j) of it, and Rayleigh
    quotients give lower bounds; the best lower bound L of an operator is a
    lower bound on its maximum. Matrices whose upper bound is below L cannot
    hold the maximum and drop out before the next squaring (squarings and
    the first pruning stage by size: `_GRAM_SQUARINGS`); the few left after
    the last squaring are decomposed exactly, in complex128. Above
    `_GRAM_BOUNDS_MAX_SIZE` a working-precision eigvalsh screens instead.
    Gradients flow through the exact decompositions.
    """
    rows, cols = real.shape[-2:]
    dtype = real.dtype
    if min(rows, cols) == 1:
        return tf.math.unsorted_segment_max(_frobenius_parts(real, imag), segment, count)
    gram_real, gram_imag = _gram_parts(real, imag)
    if min(rows, cols) > _GRAM_BOUNDS_MAX_SIZE:
        # Squarings cost more than eigvalsh itself at this size: screen with
        # eigvalsh in the working precision (complex64 for float32 kernels,
        # 2x faster, its largest eigenvalue good to ~size * eps), then redo
        # the contenders in complex128.
        screen = tf.math.real(tf.linalg.eigvalsh(tf.complex(gram_real, gram_imag)))[:, -1]
        best = tf.math.unsorted_segment_max(screen, segment, count)
        candidates = tf.where(screen >= tf.gather(best, segment) * (1 - _SCREEN_SLACK[dtype]))
        candidates = candidates[:, 0]
        top = tf.math.unsorted_segment_max(_top_eigenvalues(real, imag, candidates),
                                           tf.gather(segment, candidates), count)
        return tf.cast(tf.sqrt(tf.maximum(top, 0.0)), dtype)

    slack = _BOUND_SLACK[dtype]
    size = min(rows, cols)
    squarings, first_stage = next((j, first) for limit, j, first in _GRAM_SQUARINGS
                                  if limit is None or size <= limit)
    trace = tf.linalg.trace(gram_real)
    index = tf.range(tf.shape(real, out_type=tf.int64)[0])   # surviving matrices
    # A first lower bound where pruning starts after one squaring: the exact
    # top eigenvalue of each operator's largest-trace matrix (often the
    # maximum itself; a handful of small decompositions that run beside the
    # first squaring). Later stages have good Rayleigh bounds of their own.
    if first_stage == 1:
        largest_trace = tf.math.unsorted_segment_max(trace, segment, count)
        picked = tf.where(trace >= tf.gather(largest_trace, segment))[:, 0]
        lower = tf.math.unsorted_segment_max(_top_eigenvalues(real, imag, picked),
                                             tf.gather(segment, picked), count)
    else:
        lower = tf.zeros([count], tf.float64)
    # P_j = G^(2^j) / exp(log_scale_j), normalised to trace 1 at the start and
    # every few squarings so that nothing over- or underflows (the largest
    # eigenvalue of a trace-1 matrix of size n is at least 1/n).
    renormalise_every = _RENORMALISE_EVERY[dtype]
    power_real, power_imag, log_scale = gram_real, gram_imag, tf.zeros_like(trace, tf.float64)
    for j in range(1, squarings + 1):
        if (j - 1) % renormalise_every == 0:
            norm = tf.maximum(tf.linalg.trace(power_real), _tiny(dtype))[:, None, None]
            power_real, power_imag = power_real / norm, power_imag / norm
            log_scale = log_scale + tf.math.log(tf.cast(norm[:, 0, 0], tf.float64))
        power_real, power_imag = _hermitian_square(power_real, power_imag)
        log_scale = 2 * log_scale
        if j < first_stage:
            continue  # bounds this loose would prune (almost) nothing
        # |entry|^2 summed per column: the diagonal of P_j^2.
        column_squares = tf.reduce_sum(tf.square(power_real) + tf.square(power_imag), axis=-2)
        frobenius_squared = tf.reduce_sum(column_squares, -1)
        # Rayleigh quotient of P_j at w = P_(j-1) e_k:
        # w^H P_j w / w^H w = (P_j^2)_kk / (P_j)_kk, at the best k. No matvec.
        diagonal = tf.linalg.diag_part(power_real)
        rayleigh = tf.reduce_max(
            tf.where(diagonal > 0, column_squares / tf.maximum(diagonal, _tiny(dtype)), 0.0), -1)

        def root(x, j=j):  # the lambda_max(G) bound from a bound on lambda_max(P_j)
            return tf.exp((log_scale + tf.math.log(tf.cast(x, tf.float64))) / 2 ** j)

        upper = root(tf.sqrt(frobenius_squared))
        survivor_segment = tf.gather(segment, index)
        lower = tf.maximum(lower, tf.math.unsorted_segment_max(
            root(tf.maximum(rayleigh, _tiny(dtype))), survivor_segment, count))
        keep = tf.where(tf.logical_and(
            upper >= tf.gather(lower, survivor_segment) * (1 - slack),
            frobenius_squared > 0))[:, 0]
        index = tf.gather(index, keep)
        if j < squarings:
            power_real, power_imag = tf.gather(power_real, keep), tf.gather(power_imag, keep)
            log_scale = tf.gather(log_scale, keep)
    top = tf.math.unsorted_segment_max(_top_eigenvalues(real, imag, index),
                                       tf.gather(segment, index), count)
    return tf.cast(tf.sqrt(tf.maximum(top, 0.0)), dtype)


# ---------------------------------------------------------------------------
# Pooling: one decomposition call per matrix shape, however many layers.
#
# Per-frequency matrices of different layers (and different geometries)
# that share (rows, cols, dtype) are concatenated along the batch axis and
# decomposed by one op; on a network of small layers, op launches otherwise
# cost more than the arithmetic.


def _pools(keys):
    """{key: indices of the entries with that key}, in first-seen order."""
    pools = {}
    for index, key in enumerate(keys):
        pools.setdefault(key, []).append(index)
    return pools


def _size_key(matrices):
    """What matrices must share to be decomposed together: size and dtype."""
    return tuple(matrices.shape[-2:]), matrices.dtype


def _unflatten(values, pool, shapes, results):
    """Split pooled per-matrix `values` back into results[index], shaped like
    each entry's matrices (freqs, batch) plus `values`' trailing axes."""
    sizes = [int(np.prod(shape[:2])) for shape in shapes]
    for index, shape, part in zip(pool, shapes, _split(values, sizes)):
        results[index] = tf.reshape(part, tuple(shape[:2]) + tuple(values.shape[1:]))


def _concat(tensors):
    return tensors[0] if len(tensors) == 1 else tf.concat(tensors, axis=0)


def _split(tensor, sizes):
    return [tensor] if len(sizes) == 1 else tf.split(tensor, sizes)


def _flat(matrices):
    return tf.reshape(matrices, (-1,) + tuple(matrices.shape[-2:]))


def _largest_singular_values_pooled(entries):
    """`_largest_singular_values` of [((real, imag), count)], parts of shape
    (freqs, count * groups, rows, cols): one (count,) tensor per entry
    (column block b of an entry is operator b)."""
    results = [None] * len(entries)
    for pool in _pools([_size_key(parts[0]) for parts, _ in entries]).values():
        segments, offset = [], 0
        for index in pool:
            (real, _), count = entries[index]
            frequencies, batch = real.shape[:2]
            segments.append(np.tile(np.repeat(np.arange(count), batch // count), frequencies)
                            + offset)
            offset += count
        values = _largest_singular_values(
            _concat([_flat(entries[index][0][0]) for index in pool]),
            _concat([_flat(entries[index][0][1]) for index in pool]),
            tf.constant(np.concatenate(segments), tf.int32), offset)
        for index, value in zip(pool, _split(values, [entries[i][1] for i in pool])):
            results[index] = value
    return results


def _clip_matrices_pooled(entries):
    """`_clip_matrices` of [(matrices (freqs, batch, rows, cols), bound broadcastable to
    (freqs, batch))]: the clipped matrices, entry by entry."""
    results = [None] * len(entries)
    for pool in _pools([_size_key(matrices) for matrices, _ in entries]).values():
        flat = _concat([_flat(entries[index][0]) for index in pool])
        bound = _concat([tf.reshape(tf.broadcast_to(tf.cast(bound, matrices.dtype.real_dtype),
                                                    matrices.shape[:2]), [-1])
                         for matrices, bound in (entries[index] for index in pool)])
        _unflatten(_clip_matrices(flat, bound), pool,
                   [entries[index][0].shape for index in pool], results)
    return results


def _singular_values_pooled(entries):
    """`_matrix_singular_values` of [(real, imag or None, use_svd)], float64
    parts of shape (freqs, batch, rows, cols): one (freqs, batch, k) float64
    tensor per entry."""
    results = [None] * len(entries)
    keys = [(tuple(real.shape[-2:]), imag is None, use_svd) for real, imag, use_svd in entries]
    for (_, is_real, use_svd), pool in _pools(keys).items():
        real = _concat([_flat(entries[index][0]) for index in pool])
        imag = None if is_real else _concat([_flat(entries[index][1]) for index in pool])
        _unflatten(_matrix_singular_values(real, imag, use_svd=use_svd), pool,
                   [entries[index][0].shape for index in pool], results)
    return results


def _complex_matmul_parts(a_real, a_imag, b_real, b_imag, transpose_b=False):
    """Parts of A B (or A B^H with transpose_b) in four real matmuls: TF's
    complex64 matmul is 2-3x slower than that on small batched matrices."""
    mm = functools.partial(tf.matmul, transpose_b=transpose_b)
    sign = -1.0 if transpose_b else 1.0  # B^H = B_r^T - i B_i^T
    return (mm(a_real, b_real) - sign * mm(a_imag, b_imag),
            sign * mm(a_real, b_imag) + mm(a_imag, b_real))


def _clip_matrices(matrices, max_norm):
    """Clip every matrix's singular values at max_norm (the Frobenius-nearest
    matrix with spectral norm <= max_norm), through the Gram matrix's eigh,
    which unlike complex SVD has GPU kernels. `max_norm` broadcasts against
    the batch shape `matrices.shape[:-2]`.

    Matrices whose Gram matrix has Frobenius norm (an upper bound on the
    squared spectral norm) within max_norm^2 are left as they are: when
    most are, only the others are gathered and decomposed; when most are
    not (ResNet-32 at He initialisation and bound 1: none is), every matrix
    is decomposed in place, which saves the gather and the scatter (those
    cost ~15% of the projection). Tighter Gram-iteration bounds cost more
    than they save here.
    """
    rows, cols = matrices.shape[-2:]
    real_dtype = matrices.dtype.real_dtype
    max_norm = tf.broadcast_to(tf.cast(max_norm, real_dtype), tf.shape(matrices)[:-2])
    if min(rows, cols) == 1:
        # A row or column: its Frobenius norm is its only singular value.
        sigma = _frobenius(matrices)
        scale = tf.minimum(1.0, max_norm / tf.maximum(sigma, _tiny(real_dtype)))
        return matrices * tf.cast(scale, matrices.dtype)[..., None, None]
    shape = tf.shape(matrices)
    flat = tf.reshape(matrices, (-1, rows, cols))
    bound = tf.reshape(max_norm, [-1])
    real, imag = tf.math.real(flat), tf.math.imag(flat)
    gram_real, gram_imag = _gram_parts(real, imag)

    def clip(real, imag, gram_real, gram_imag, bound):
        eigenvalues, vectors = tf.linalg.eigh(tf.complex(gram_real, gram_imag))
        sigma = tf.sqrt(tf.maximum(tf.math.real(eigenvalues), 0.0))
        # Scale factor 1 for every singular value already below the bound
        # (and for zero ones); max_norm / sigma above it.
        bound = bound[:, None]
        factor = tf.where(sigma > bound, bound / tf.maximum(sigma, bound), 1.0)[:, None, :]
        v_real, v_imag = tf.math.real(vectors), tf.math.imag(vectors)
        # shrink = V diag(factor) V^H, then shrink A (or A shrink).
        shrink = _complex_matmul_parts(v_real * factor, v_imag * factor, v_real, v_imag,
                                       transpose_b=True)
        return (_complex_matmul_parts(*shrink, real, imag) if rows <= cols
                else _complex_matmul_parts(real, imag, *shrink))

    over = (_frobenius_parts(gram_real, gram_imag)
            > tf.square(bound) * (1 - _BOUND_SLACK[real_dtype]))

    def all_matrices():
        return clip(real, imag, gram_real, gram_imag, bound)

    def only_those_over():
        index = tf.where(over)
        pick = functools.partial(tf.gather_nd, indices=index)
        clipped = clip(pick(real), pick(imag), pick(gram_real), pick(gram_imag), pick(bound))
        return (tf.tensor_scatter_nd_update(real, index, clipped[0]),
                tf.tensor_scatter_nd_update(imag, index, clipped[1]))

    count_over = tf.reduce_sum(tf.cast(over, tf.int32))
    clipped = tf.cond(2 * count_over > tf.size(over), all_matrices, only_those_over)
    return tf.reshape(tf.complex(*clipped), shape)


# ---------------------------------------------------------------------------
# Public API.


def conv_transfer_matrices(kernel, input_shape, strides=1, dilation_rate=1, groups=1):
    """The per-frequency matrices whose singular values are the operator's.

    Args:
      kernel: Keras layout `(*spatial, c_in // groups, c_out)`, array or tensor.
      input_shape: spatial input size (an int: the same on every axis).
      strides, dilation_rate: int or per-axis tuple, as Keras layers take them.
      groups: channel groups (`c_in` for depthwise).

    Returns:
      `(matrices, weights)`: complex `matrices` of shape
      `(frequencies, groups, c_out // groups, prod(strides) * c_in // groups)`
      (complex64 for float32 kernels, complex128 for float64) and int64
      `weights` of shape `(frequencies,)`: how many frequencies of the full
      spectrum each matrix stands for (conjugate pairs count twice; a
      frequency-independent matrix counts for all). The operator's singular
      values are those of every matrix, each repeated `weights` times.
    """
    kernel = _prepare_kernel(kernel)
    geometry = _Geometry(kernel.shape, input_shape, strides, dilation_rate, groups)
    _, complex_dtype = _work_dtypes(kernel.dtype)
    # Stored transposed (see `_forward`); returned as P(w).
    return (tf.linalg.matrix_transpose(_forward(kernel, geometry, complex_dtype)),
            tf.constant(geometry.weights))


_GEOMETRY_KEYS = ("input_shape", "strides", "dilation_rate", "groups")


class _Stack:
    """Kernels of one shape, dtype and geometry, concatenated along c_out.

    Several same-geometry kernels side by side are one grouped convolution
    with `groups * count` groups: its operator is block diagonal over them,
    so one pass over the stacked kernel does every kernel's work with a
    fraction of the op launches. `indices` are the kernels' positions in the
    caller's list.
    """

    def __init__(self, indices, kernels, geometry):
        self.indices = indices
        self.count = len(kernels)
        self.c_out = int(kernels[0].shape[-1])
        self.stacked = tf.concat(kernels, axis=-1) if len(kernels) > 1 else kernels[0]
        self.out_dtype = self.stacked.dtype
        self.real_dtype, self.complex_dtype = _work_dtypes(self.out_dtype)
        self.geometry = _Geometry(self.stacked.shape, geometry.input_shape, geometry.strides,
                                  geometry.dilation_rate, geometry.groups * len(kernels))
        self.groups_per_kernel = geometry.groups

    def forward(self, stacked):
        return _forward(stacked, self.geometry, self.complex_dtype)

    def per_channel(self, values):
        """(count,) -> broadcastable over the stacked kernel's last axis."""
        return tf.repeat(values, self.c_out)

    def unstack(self, stacked):
        """(*shape[:-1], count * c_out) -> [count kernels of shape (*shape[:-1], c_out)]."""
        return [stacked] if self.count == 1 else tf.split(stacked, self.count, axis=-1)


def _geometry_kwargs(geometry, index):
    """A `geometries` entry as keyword arguments of `_Geometry`."""
    if hasattr(geometry, "spectral_kwargs"):
        geometry = geometry.spectral_kwargs()
    if not isinstance(geometry, dict) or "input_shape" not in geometry \
            or set(geometry) - set(_GEOMETRY_KEYS):
        raise ValueError(
            f"geometries[{index}] must be a dict with key 'input_shape' and optionally "
            f"'strides', 'dilation_rate', 'groups' (the keyword arguments of "
            f"conv_singular_values), got geometries[{index}]={geometry!r}")
    return dict(dict(strides=1, dilation_rate=1, groups=1), **geometry)


def _plan(kernels, geometries):
    """Validate `kernels` / `geometries` and stack the kernels that share shape,
    dtype and geometry. Returns (number of kernels, [_Stack])."""
    for name, value in (("kernels", kernels), ("geometries", geometries)):
        if tf.is_tensor(value) or isinstance(value, (np.ndarray, dict, str)):
            raise TypeError(f"{name} must be a list (one entry per kernel), got a "
                            f"{type(value).__name__}")
    kernels, geometries = list(kernels), list(geometries)
    if not kernels:
        raise ValueError("kernels is empty")
    if len(kernels) != len(geometries):
        raise ValueError(f"kernels and geometries must have the same length, got "
                         f"{len(kernels)} kernels and {len(geometries)} geometries")
    stacks = {}
    for index, (kernel, geometry) in enumerate(zip(kernels, geometries)):
        name = "kernel" if len(kernels) == 1 else f"kernels[{index}]"
        kernel = _prepare_kernel(kernel, name)
        kwargs = _geometry_kwargs(geometry, index)
        try:
            g = _Geometry(kernel.shape, **kwargs)
        except ValueError as error:
            if len(kernels) == 1:
                raise
            raise ValueError(f"kernels[{index}]: {error}") from None
        key = (tuple(kernel.shape), kernel.dtype, g.input_shape, g.strides, g.dilation_rate,
               g.groups)
        entry = stacks.setdefault(key, ([], [], g))
        entry[0].append(index)
        entry[1].append(kernel)
    return len(kernels), [_Stack(indices, ks, g) for indices, ks, g in stacks.values()]


def _scatter(count, stacks, per_stack):
    """Per-stack lists of per-kernel results -> one list in the caller's order."""
    out = [None] * count
    for stack, results in zip(stacks, per_stack):
        for index, result in zip(stack.indices, results):
            out[index] = result
    return out


def _batch_arguments(kernels, input_shape, strides, dilation_rate, groups):
    """The `*_batch` functions' arguments as `_plan`'s, with their one-shape check."""
    if tf.is_tensor(kernels) or isinstance(kernels, np.ndarray):
        raise TypeError("kernels must be a list of kernels of one shape, got a single "
                        f"{type(kernels).__name__} of shape {tuple(kernels.shape)}")
    kernels = list(kernels)
    if not kernels:
        raise ValueError("kernels is empty")
    kernels = [_prepare_kernel(k) for k in kernels]
    first = kernels[0]
    for index, k in enumerate(kernels):
        if k.shape != first.shape or k.dtype != first.dtype:
            raise ValueError(
                f"kernels must share one shape and dtype: kernels[0] is {first.dtype.name} "
                f"{tuple(first.shape)}, kernels[{index}] is {k.dtype.name} {tuple(k.shape)}")
    # Validate as the user wrote it, so that errors name their arguments.
    _Geometry(first.shape, input_shape, strides, dilation_rate, groups)
    geometry = dict(input_shape=input_shape, strides=strides, dilation_rate=dilation_rate,
                    groups=groups)
    return kernels, [geometry] * len(kernels)


def conv_singular_values(kernel, input_shape, strides=1, dilation_rate=1, groups=1):
    """Every singular value of a convolution layer's linear operator.

    Exact for circular ("wrap-around") boundary conditions. For zero-padded
    layers ('same' / 'valid') the circular operator's largest singular value
    bounds the padded operator's norm from above (the padded operator is a
    restriction of a circular one on a larger grid when the input is padded
    first; in practice the two spectra agree closely away from the edges).

    Args:
      kernel: Keras layout `(*spatial, c_in // groups, c_out)` for a 1-D, 2-D
        or 3-D convolution (a rank-2 `(in, out)` matrix with `input_shape=()`
        for a Dense layer); NumPy array or tensor, float32 or float64.
      input_shape: the spatial input size (no batch, no channels); an int
        means that size on every spatial axis. It may be smaller than the
        kernel: wrapped taps fold onto each other, as in the operator.
      strides: int or per-axis tuple; each stride must divide its input size.
      dilation_rate: int or per-axis tuple.
      groups: number of channel groups; `c_in` for a depthwise convolution.

    Returns:
      A 1-D tensor in the kernel's dtype holding all
      `groups * prod(input_shape / strides) * min(c_out / groups,
      prod(strides) * c_in / groups)` singular values, multiplicities kept,
      sorted descending.

    Raises:
      ValueError: inconsistent shapes, a stride that does not divide the
        input size, or non-positive sizes.
      tf.errors.InvalidArgumentError: NaN or Inf in the kernel.
    """
    return conv_singular_values_many(
        [kernel], [dict(input_shape=input_shape, strides=strides, dilation_rate=dilation_rate,
                        groups=groups)])[0]


def conv_singular_values_batch(kernels, input_shape, strides=1, dilation_rate=1, groups=1):
    """`conv_singular_values` of several kernels of one shape and geometry, in one pass.

    Cheaper than a loop (a network has many layers of the same shape). Takes
    a list of kernels; returns a tensor of shape `(len(kernels), count)`, row
    b the sorted spectrum of `kernels[b]`.
    """
    return tf.stack(conv_singular_values_many(
        *_batch_arguments(kernels, input_shape, strides, dilation_rate, groups)))


def conv_singular_values_many(kernels, geometries):
    """`conv_singular_values` of many kernels of any shapes and geometries, in one pass.

    What a whole network needs: kernels that share a shape and geometry are
    stacked, and every per-frequency matrix of one size, whichever layer it
    comes from, goes through a single decomposition op.

    Args:
      kernels: a list of kernels, each as for `conv_singular_values`.
      geometries: a list of the same length; entry i holds kernel i's
        geometry as a dict of `conv_singular_values`' keyword arguments
        (`input_shape`, and optionally `strides`, `dilation_rate`, `groups`),
        or an object with a `spectral_kwargs()` method returning one (as
        `tfconvnorm.ConvGeometry` does).

    Returns:
      A list: entry i is `conv_singular_values(kernels[i], **geometries[i])`.
    """
    count, stacks = _plan(kernels, geometries)
    # The decomposition runs in complex128 (the Gram route squares the
    # condition number), so the transform is done in float64 straight away.
    entries = []
    for stack in stacks:
        real, imag = _forward_parts(stack.stacked, stack.geometry, tf.float64)
        # Where every axis is frequency-independent (1x1 convs, Dense) the
        # matrices are real: real Gram and eigvalsh, 4x fewer flops. float64
        # kernels go by SVD, for full relative accuracy.
        entries.append((real, None if stack.geometry.real else imag,
                        stack.real_dtype == tf.float64))
    pooled = _singular_values_pooled(entries)
    per_stack = []
    for stack, values in zip(stacks, pooled):
        frequencies = values.shape[0]
        per_frequency = values.shape[1] * values.shape[2] // stack.count
        values = tf.transpose(tf.reshape(values, (frequencies, stack.count, per_frequency)),
                              [1, 0, 2])
        repeats = tf.repeat(tf.constant(stack.geometry.weights), per_frequency)
        values = tf.repeat(tf.reshape(values, (stack.count, -1)), repeats, axis=1)
        values = tf.cast(tf.sort(values, axis=-1, direction="DESCENDING"), stack.out_dtype)
        per_stack.append(tf.unstack(values) if stack.count > 1 else [values[0]])
    return _scatter(count, stacks, per_stack)


def conv_operator_norm(kernel, input_shape, strides=1, dilation_rate=1, groups=1):
    """The largest singular value of the layer's operator (circular boundary).

    Same arguments as `conv_singular_values`. Differentiable with respect to
    the kernel. Exact, not an estimate: cheap Gram-iteration bounds select the
    few frequencies that can hold the maximum, and only those are
    decomposed, by `eigvalsh` in complex128 (so this runs on a GPU too). The
    result has the kernel's dtype.
    """
    return conv_operator_norm_many(
        [kernel], [dict(input_shape=input_shape, strides=strides, dilation_rate=dilation_rate,
                        groups=groups)])[0]


def conv_operator_norm_batch(kernels, input_shape, strides=1, dilation_rate=1, groups=1):
    """`conv_operator_norm` of several kernels of one shape and geometry, in one
    pass; returns a tensor of shape `(len(kernels),)`. Differentiable."""
    return tf.stack(conv_operator_norm_many(
        *_batch_arguments(kernels, input_shape, strides, dilation_rate, groups)))


def conv_operator_norm_many(kernels, geometries):
    """`conv_operator_norm` of many kernels of any shapes and geometries, in one pass.

    Arguments as for `conv_singular_values_many`; returns a list of scalar
    tensors, entry i the norm of `kernels[i]` in its dtype. Differentiable.
    """
    count, stacks = _plan(kernels, geometries)
    norms = _norms_of_stacks(stacks, [stack.stacked for stack in stacks])
    return _scatter(count, stacks, [tf.unstack(tf.cast(n, stack.out_dtype))
                                    for stack, n in zip(stacks, norms)])


def _norms_of_stacks(stacks, stacked_kernels):
    """Per stack, the (count,) norms (working dtype) of its kernels, given stacked.

    Each kernel is divided by its largest entry first (the norm is
    positively homogeneous), so that Gram matrices and their squarings
    neither overflow nor underflow.
    """
    entries, scales = [], []
    for stack, k in zip(stacks, stacked_kernels):
        k = tf.cast(k, stack.real_dtype)
        scale = tf.reduce_max(tf.abs(tf.reshape(k, (-1, stack.count, stack.c_out))), axis=[0, 2])
        scale = tf.stop_gradient(_safe_scale(scale))
        parts = _forward_parts(k / stack.per_channel(scale), stack.geometry, stack.real_dtype)
        entries.append((parts, stack.count))
        scales.append(scale)
    return [norms * scale for norms, scale in
            zip(_largest_singular_values_pooled(entries), scales)]


def _check_max_norm(max_norm):
    if tf.is_tensor(max_norm) and not tf.executing_eagerly():
        message = f"max_norm must be a positive finite number, got max_norm={max_norm!r}"
        value = tf.debugging.assert_all_finite(tf.cast(max_norm, tf.float64), message)
        with tf.control_dependencies([tf.debugging.assert_positive(value, message=message)]):
            return tf.identity(value)
    value = np.asarray(max_norm.numpy() if tf.is_tensor(max_norm) else max_norm)
    if value.ndim != 0 or not np.issubdtype(value.dtype, np.number) or np.iscomplexobj(value):
        raise ValueError(f"max_norm must be a positive finite number, got max_norm={max_norm!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"max_norm must be a positive finite number, got max_norm={max_norm!r}")
    return float(value)


def clip_conv_singular_values(kernel, input_shape, max_norm, strides=1, dilation_rate=1,
                              groups=1, method=DEFAULT_METHOD, iterations=None,
                              tolerance=DEFAULT_EXACT_TOLERANCE):
    """Project a kernel towards {kernels of this support with operator norm <= max_norm}.

    Every per-frequency singular value above `max_norm` is clipped to it and
    the result is mapped back to a kernel of the original shape and support
    (the least-squares kernel, which for an input at least as large as the
    dilated kernel is the inverse DFT cut back to the support). That last
    step can raise the norm again; the methods differ in what they do next.

    Args:
      kernel, input_shape, strides, dilation_rate, groups: as in
        `conv_singular_values`.
      max_norm: the bound, a positive finite number (or scalar tensor).
      method:
        * "alternating" (default): `iterations` rounds (default 4) of clip
          then cut back (alternating projections between the norm ball and
          the support), then one rescale by `max_norm / norm` if the norm is
          still above the bound. Guarantees
          `conv_operator_norm(result) <= max_norm` up to float rounding
          (well inside `max_norm * (1 + 1e-4)`).
        * "paper": the published single clip-then-cut (Sedghi et al. 2019),
          for reproducing the paper. Does not guarantee the bound.
        * "exact": the Euclidean (Frobenius) projection of the kernel onto
          {this support} intersected with {operator norm <= max_norm}, by
          Dykstra's alternating projections, stopped when an iteration
          changes the kernel by less than `tolerance` (relative) or after
          `iterations` (default 500); then the same guarantee rescale as
          "alternating" (a no-op once converged). Needs an input at least as
          large as the dilated kernel on every axis (without folded taps the
          DFT is an isometry on kernels, which makes the operator-space
          projection the kernel-space one).
      iterations: rounds for "alternating" / cap for "exact".
      tolerance: stopping tolerance for "exact".

    Returns:
      A kernel of the same shape and dtype. For "alternating" and "exact" a
      kernel already inside the set is returned unchanged.

    Raises:
      ValueError: bad geometry, `max_norm` <= 0 or not finite, unknown method.
      tf.errors.InvalidArgumentError: NaN or Inf in the kernel (nothing is
        returned that could be written into a variable).
    """
    return clip_conv_singular_values_many(
        [kernel], [dict(input_shape=input_shape, strides=strides, dilation_rate=dilation_rate,
                        groups=groups)],
        max_norm, method=method, iterations=iterations, tolerance=tolerance)[0]


def clip_conv_singular_values_batch(kernels, input_shape, max_norm, strides=1, dilation_rate=1,
                                    groups=1, method=DEFAULT_METHOD, iterations=None,
                                    tolerance=DEFAULT_EXACT_TOLERANCE):
    """`clip_conv_singular_values` of several kernels of one shape and geometry.

    One pass for all of them (each kernel is projected on its own: the
    operators are independent). Returns a tensor of shape
    `(len(kernels), *kernel_shape)`. Kernels already inside are returned
    unchanged, each on its own.
    """
    return tf.stack(clip_conv_singular_values_many(
        *_batch_arguments(kernels, input_shape, strides, dilation_rate, groups), max_norm,
        method=method, iterations=iterations, tolerance=tolerance))


def clip_conv_singular_values_many(kernels, geometries, max_norm, method=DEFAULT_METHOD,
                                   iterations=None, tolerance=DEFAULT_EXACT_TOLERANCE):
    """`clip_conv_singular_values` of many kernels of any shapes and geometries.

    Each kernel is projected on its own, with the same bound, and exactly as
    `clip_conv_singular_values` would (kernels inside come back unchanged);
    the decompositions of all of them are pooled, one op per matrix size.
    This is what `OperatorNormClipper` runs. `kernels` and `geometries` as
    for `conv_singular_values_many`; returns a list of kernels.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}")
    max_norm = _check_max_norm(max_norm)
    if iterations is None:
        iterations = (DEFAULT_EXACT_MAX_ITERATIONS if method == "exact"
                      else DEFAULT_ALTERNATING_ITERATIONS)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got iterations={iterations!r}")
    count, stacks = _plan(kernels, geometries)
    if method == "exact":
        for stack in stacks:
            g = stack.geometry
            if g.folded:
                extent = tuple((k - 1) * r + 1 for k, r in zip(g.kernel_size, g.dilation_rate))
                where = "" if count == 1 else f"kernels[{stack.indices[0]}]: "
                raise ValueError(
                    f"{where}method='exact' needs input_shape={g.input_shape} at least as "
                    f"large as the dilated kernel {extent} on every axis; use "
                    f"method='alternating'")

    # The projection is positively homogeneous, so each kernel works on
    # kernel / max|kernel|: Gram matrices of a huge (diverged but finite)
    # kernel would overflow.
    works, bounds, scales, matrix_bounds = [], [], [], []
    for stack in stacks:
        original = tf.cast(stack.stacked, stack.real_dtype)
        scale = tf.reduce_max(tf.abs(tf.reshape(original, (-1, stack.count, stack.c_out))),
                              axis=[0, 2])
        scale = _safe_scale(scale)
        # Via float64: tf.cast of a Python float would round it to float32 first.
        bound = tf.cast(tf.convert_to_tensor(max_norm, tf.float64), stack.real_dtype) / scale
        works.append(original / stack.per_channel(scale))
        scales.append(scale)
        bounds.append(bound)
        matrix_bounds.append(tf.repeat(bound, stack.groups_per_kernel)[None, :])

    def clip_once(ks):
        clipped = _clip_matrices_pooled([(stack.forward(k), b) for stack, k, b in
                                         zip(stacks, ks, matrix_bounds)])
        return [_inverse(m, stack.geometry, stack.real_dtype)
                for stack, m in zip(stacks, clipped)]

    def rescale(ks):
        return [k * stack.per_channel(tf.where(n > b, b / n, tf.ones_like(n)))
                for stack, k, n, b in zip(stacks, ks, _norms_of_stacks(stacks, ks), bounds)]

    def finish(stack, k, scale):
        return tf.cast(k * stack.per_channel(scale), stack.out_dtype)

    if method == "paper":
        results = [finish(*args) for args in zip(stacks, clip_once(works), scales)]
    else:
        inside = [n <= b * (1 + _INSIDE_RTOL[stack.real_dtype]) for stack, n, b in
                  zip(stacks, _norms_of_stacks(stacks, works), bounds)]

        def project():
            if method == "alternating":
                ks = works
                for _ in range(int(iterations)):
                    ks = clip_once(ks)
            else:
                ks = []
                for stack, k, b in zip(stacks, works, matrix_bounds):
                    g = stack.geometry
                    run = _dykstra_function(tuple(stack.stacked.shape), g.input_shape,
                                            g.strides, g.dilation_rate, g.groups,
                                            stack.real_dtype.name, int(iterations),
                                            float(tolerance))
                    ks.append(run(k, b))
            # Kernels inside stay the input itself, bit for bit.
            return [tf.where(stack.per_channel(i), stack.stacked, finish(stack, k, scale))
                    for stack, k, i, scale in zip(stacks, rescale(ks), inside, scales)]

        all_inside = tf.reduce_all(tf.concat(inside, axis=0))
        results = tf.cond(all_inside, lambda: [tf.identity(s.stacked) for s in stacks], project)
    return _scatter(count, stacks, [stack.unstack(r) for stack, r in zip(stacks, results)])


@functools.lru_cache(maxsize=64)
def _dykstra_function(kernel_shape, input_shape, strides, dilation_rate, groups, dtype_name,
                      max_iterations, tolerance):
    """Dykstra's loop as a tf.function per geometry: eagerly, hundreds of
    iterations of small ops would cost seconds."""
    geometry = _Geometry(tf.TensorShape(kernel_shape), input_shape, strides, dilation_rate,
                         groups)
    real_dtype = tf.as_dtype(dtype_name)
    _, complex_dtype = _work_dtypes(real_dtype)

    @tf.function
    def run(kernel, bound):
        return _dykstra(kernel, geometry, bound, complex_dtype, real_dtype, max_iterations,
                        tolerance)

    return run


def _dykstra(kernel, geometry, bound, complex_dtype, real_dtype, max_iterations, tolerance):
    """Dykstra's algorithm between the norm ball (per-frequency clip) and the
    support subspace (least-squares cut back). The subspace being linear, only
    the ball step needs a correction term."""
    matrices = _forward(kernel, geometry, complex_dtype)
    tolerance = tf.cast(tolerance, real_dtype)

    def body(i, k, correction, _):
        shifted = _forward(k, geometry, complex_dtype) + correction
        clipped = _clip_matrices(shifted, bound)
        new_k = _inverse(clipped, geometry, real_dtype)
        change = tf.norm(new_k - k) / tf.maximum(tf.norm(new_k), _tiny(real_dtype))
        return i + 1, new_k, shifted - clipped, change

    def cond(i, k, correction, change):
        return tf.logical_and(i < max_iterations, change > tolerance)

    _, k, _, _ = tf.while_loop(
        cond, body,
        (tf.constant(0), kernel, tf.zeros_like(matrices), tf.constant(np.inf, real_dtype)))
    return k
