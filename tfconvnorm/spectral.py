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

The per-frequency transform is a product of small per-axis DFT matrices (a
tensordot per spatial axis) rather than a zero-padded FFT: it folds wrapped
taps, handles dilation and the polyphase split in one step, and costs
O(n k) per axis, which for conv kernels (k << n) is cheaper than O(n log n).

Decompositions, and where they run: singular values of float32 kernels come
from `tf.linalg.eigvalsh` of the per-frequency Gram matrices in complex128
(eigvalsh has CPU and GPU kernels); the few matrices whose condition number
would make that inaccurate for small singular values are redone with
`tf.linalg.svd`. float64 kernels use `tf.linalg.svd` throughout, for full
relative accuracy. TensorFlow has no GPU kernel for complex SVD, so those
SVDs run on the CPU even inside a GPU program. Operator norms and
projections use `eigvalsh` / `eigh` only, so they run wholly on a GPU.

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
#: pick the candidates for the largest singular value; the upper bound is
#: within a factor size^(1/2^j) of the truth.
_GRAM_SQUARINGS = 3
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
        self.factors = [
            _axis_factors(k, n, s, r, half=(axis == half_axis), constant=constant[axis])
            for axis, (k, n, s, r) in enumerate(
                zip(self.kernel_size, self.input_shape, self.strides, self.dilation_rate))]
        self.folded = any(f.folded for f in self.factors)
        self.freq_shape = tuple(f.forward.shape[0] for f in self.factors)
        self.num_frequencies = int(np.prod(self.freq_shape, dtype=np.int64))
        weights = np.ones((), dtype=np.int64)
        for f in self.factors:
            weights = np.multiply.outer(weights, f.weights)
        #: How many of the full spectrum's frequencies each computed one stands for.
        self.weights = weights.reshape(-1)


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


def _forward(kernel, geometry, complex_dtype):
    """Per-frequency matrices, shape (frequencies, groups, rows, cols).

    Works on real and imaginary parts separately: a real kernel needs half
    the products, and TF's complex128 tensordot is several times slower than
    two float64 ones.
    """
    g = geometry
    real_dtype = complex_dtype.real_dtype
    real = tf.reshape(tf.cast(kernel, real_dtype), g.kernel_size + (g.c_in_group * g.c_out,))
    imag = None
    for f in g.factors:
        # Contract the leading tap axis; (freq, phase) axes are appended.
        f_re = tf.constant(f.forward.real, real_dtype)
        f_im = tf.constant(f.forward.imag, real_dtype)
        dot = functools.partial(tf.tensordot, axes=[[0], [2]])
        if imag is None:
            real, imag = dot(real, f_re), dot(real, f_im)
        else:
            real, imag = dot(real, f_re) - dot(imag, f_im), dot(real, f_im) + dot(imag, f_re)
    x = tf.complex(real, imag) if imag is not None else tf.cast(real, complex_dtype)
    # x: (c_in_group * c_out, w_1, phase_1, ..., w_d, phase_d)
    x = tf.reshape(x, (g.c_in_group, g.groups, g.c_out_group)
                   + sum(((w, s) for w, s in zip(g.freq_shape, g.strides)), ()))
    d = g.rank
    freq_axes = [3 + 2 * j for j in range(d)]
    phase_axes = [4 + 2 * j for j in range(d)]
    x = tf.transpose(x, freq_axes + [1, 2] + phase_axes + [0])
    return tf.reshape(x, (g.num_frequencies, g.groups, g.rows, g.cols))


def _inverse(matrices, geometry, real_dtype):
    """Least-squares kernel (same support) of conjugate-symmetric per-frequency matrices."""
    g = geometry
    complex_dtype = matrices.dtype
    d = g.rank
    x = tf.reshape(matrices, g.freq_shape + (g.groups, g.c_out_group) + g.strides
                   + (g.c_in_group,))
    # -> (c_in_group, groups, c_out_group, w_1, phase_1, ..., w_d, phase_d)
    perm = [2 * d + 2, d, d + 1] + sum(([j, d + 2 + j] for j in range(d)), [])
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


def _gram(matrices):
    """The smaller Gram matrix, P P^H or P^H P."""
    rows, cols = matrices.shape[-2:]
    return tf.matmul(matrices, matrices, adjoint_b=rows <= cols,
                     adjoint_a=rows > cols)


def _matrix_singular_values(matrices, use_svd):
    """Singular values of each matrix (any batch shape), ascending, float64."""
    rows, cols = matrices.shape[-2:]
    matrices = tf.cast(matrices, tf.complex128)
    if min(rows, cols) == 1:
        axis = -1 if rows == 1 else -2
        return _frobenius(matrices, axis)
    if use_svd:
        return tf.reverse(tf.linalg.svd(matrices, compute_uv=False), axis=[-1])
    eigenvalues = tf.math.real(tf.linalg.eigvalsh(_gram(matrices)))
    values = tf.sqrt(tf.maximum(eigenvalues, 0.0))
    # Ill-conditioned matrices (and exactly singular ones) lose their small
    # singular values in the Gram matrix; redo just those with an SVD.
    lam_max = eigenvalues[..., -1:]
    poor = tf.where(eigenvalues[..., 0] <= _GRAM_CONDITION_THRESHOLD * lam_max[..., 0])
    redone = tf.reverse(tf.linalg.svd(tf.gather_nd(matrices, poor), compute_uv=False),
                        axis=[-1])
    return tf.tensor_scatter_nd_update(values, poor, redone)


def _eigenvalue_bounds(gram):
    """Cheap bounds on each Gram matrix's largest eigenvalue (Gram iteration).

    With H the trace-normalised Gram matrix, lambda_max(H) <=
    ||H^(2^j)||_F^(1/2^j) (within a factor size^(1/2^j)), and the Rayleigh
    quotient of H at the largest-diagonal column of H^(2^j) is a lower bound.
    Returns (upper, lower), each of shape (batch,), in the Gram's real dtype.
    """
    real_dtype = gram.dtype.real_dtype
    trace = tf.math.real(tf.linalg.trace(gram))
    normalised = gram / tf.cast(tf.maximum(trace, _tiny(real_dtype)), gram.dtype)[:, None, None]
    power = normalised
    for _ in range(_GRAM_SQUARINGS):
        power = tf.matmul(power, power)
    upper = trace * tf.norm(tf.abs(power), axis=[-2, -1]) ** (1.0 / 2 ** _GRAM_SQUARINGS)
    column = tf.argmax(tf.math.real(tf.linalg.diag_part(power)), axis=-1)
    vector = tf.gather(tf.linalg.matrix_transpose(power), column, batch_dims=1)
    quotient = (tf.reduce_sum(tf.math.conj(vector) * tf.linalg.matvec(normalised, vector), -1)
                / tf.cast(tf.maximum(tf.reduce_sum(tf.abs(vector) ** 2, -1), _tiny(real_dtype)),
                          gram.dtype))
    return upper, trace * tf.math.real(quotient)


def _safe_scale(scale):
    """Per-operator max |entry| as a divisor that keeps squares in range: 1
    where an operator is all zeros."""
    return tf.where(scale > 0, scale, tf.ones_like(scale))


def _largest_singular_values(matrices, count):
    """The largest singular value of each of `count` operators, exactly.

    `matrices` has shape (frequencies, count * groups, rows, cols): operator
    b owns groups [b * groups, (b + 1) * groups). Decomposing every frequency
    is wasteful when only the maximum matters: a matrix whose upper bound
    (`_eigenvalue_bounds`) stays below the best lower bound of its operator
    cannot hold that operator's maximum, so only the others (usually one or
    two per operator) get an exact eigendecomposition, in complex128.
    Gradients flow through that decomposition.
    """
    rows, cols = matrices.shape[-2:]
    frequencies, batch = matrices.shape[0], matrices.shape[1]
    per_operator = frequencies * (batch // count)
    matrices = tf.reshape(matrices, (frequencies, count, batch // count, rows, cols))
    matrices = tf.reshape(tf.transpose(matrices, [1, 0, 2, 3, 4]), (-1, rows, cols))
    segment = tf.repeat(tf.range(count), per_operator)
    real_dtype = matrices.dtype.real_dtype
    if min(rows, cols) == 1:
        values = _matrix_singular_values(matrices, use_svd=False)[:, 0]
        return tf.cast(tf.math.unsorted_segment_max(values, segment, count), real_dtype)
    # Each operator scaled by its largest entry, so that squaring cannot
    # overflow (or underflow) in complex64.
    scale = tf.math.unsorted_segment_max(tf.reduce_max(tf.abs(matrices), axis=[-2, -1]),
                                         segment, count)
    scale = tf.stop_gradient(_safe_scale(scale))
    scaled = matrices / tf.cast(tf.gather(scale, segment), matrices.dtype)[:, None, None]
    if min(rows, cols) <= _GRAM_BOUNDS_MAX_SIZE:
        upper, lower = _eigenvalue_bounds(_gram(scaled))
        slack = _BOUND_SLACK[real_dtype]
    else:
        # Squarings cost more than eigvalsh itself at this size: screen with
        # eigvalsh in the working precision (complex64 for float32 kernels,
        # 2x faster, its largest eigenvalue good to ~size * eps), then redo
        # the contenders in complex128.
        upper = lower = tf.math.real(tf.linalg.eigvalsh(_gram(scaled)))[:, -1]
        slack = _SCREEN_SLACK[real_dtype]
    best_lower = tf.math.unsorted_segment_max(lower, segment, count)
    candidates = tf.where(upper >= tf.gather(best_lower, segment) * (1 - slack))[:, 0]
    chosen = tf.cast(tf.gather(matrices, candidates), tf.complex128)
    top = tf.math.real(tf.linalg.eigvalsh(_gram(chosen)))[:, -1]
    top = tf.math.unsorted_segment_max(top, tf.gather(segment, candidates), count)
    return tf.cast(tf.sqrt(tf.maximum(top, 0.0)), real_dtype)


def _clip_matrices(matrices, max_norm):
    """Clip every matrix's singular values at max_norm (the Frobenius-nearest
    matrix with spectral norm <= max_norm), through the Gram matrix's eigh,
    which unlike complex SVD has GPU kernels. `max_norm` broadcasts against
    the batch shape `matrices.shape[:-2]`.

    Matrices whose Gram matrix has Frobenius norm (an upper bound on the
    squared spectral norm) within max_norm^2 are left as they are, without a
    decomposition. The tighter Gram-iteration bounds cost more than they
    save here: most frequencies of a kernel being projected sit at or above
    the bound (on ResNet-32, 305 ms with them, 267 ms without).
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
    gram = _gram(flat)
    over = tf.where(_frobenius(gram) > tf.square(bound) * (1 - _BOUND_SLACK[real_dtype]))
    bound = tf.gather_nd(bound, over)[:, None]
    eigenvalues, vectors = tf.linalg.eigh(tf.gather_nd(gram, over))
    sigma = tf.sqrt(tf.maximum(tf.math.real(eigenvalues), 0.0))
    # Scale factor 1 for every singular value already below the bound (and
    # for zero ones); max_norm / sigma above it.
    factor = tf.where(sigma > bound, bound / tf.maximum(sigma, bound), 1.0)
    shrink = tf.matmul(vectors * tf.cast(factor, matrices.dtype)[..., None, :], vectors,
                       adjoint_b=True)
    chosen = tf.gather_nd(flat, over)
    clipped = tf.matmul(shrink, chosen) if rows <= cols else tf.matmul(chosen, shrink)
    return tf.reshape(tf.tensor_scatter_nd_update(flat, over, clipped), shape)


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
    return _forward(kernel, geometry, complex_dtype), tf.constant(geometry.weights)


def _stack(kernels, input_shape, strides, dilation_rate, groups):
    """Kernels of one shape, concatenated along c_out.

    Several same-geometry kernels side by side are one grouped convolution
    with `groups * count` groups: its operator is block diagonal over them,
    so one pass over the stacked kernel does every kernel's work with a
    fraction of the op launches. Returns (stacked, count, geometry of the
    stack).
    """
    if tf.is_tensor(kernels) or isinstance(kernels, np.ndarray):
        raise TypeError("kernels must be a list of kernels of one shape, got a single "
                        f"{type(kernels).__name__} of shape {tuple(kernels.shape)}")
    kernels = [_prepare_kernel(k) for k in kernels]
    if not kernels:
        raise ValueError("kernels is empty")
    first = kernels[0]
    for index, k in enumerate(kernels):
        if k.shape != first.shape or k.dtype != first.dtype:
            raise ValueError(
                f"kernels must share one shape and dtype: kernels[0] is {first.dtype.name} "
                f"{tuple(first.shape)}, kernels[{index}] is {k.dtype.name} {tuple(k.shape)}")
    # Validate as the user wrote it, so errors name their groups.
    _Geometry(first.shape, input_shape, strides, dilation_rate, groups)
    stacked = tf.concat(kernels, axis=-1) if len(kernels) > 1 else first
    geometry = _Geometry(stacked.shape, input_shape, strides, dilation_rate,
                         groups * len(kernels))
    return stacked, len(kernels), geometry


def _unstack(stacked, count):
    """(*shape[:-1], count * c_out) -> (count, *shape[:-1], c_out)."""
    shape = stacked.shape
    x = tf.reshape(stacked, tuple(shape[:-1]) + (count, shape[-1] // count))
    rank = len(shape)
    return tf.transpose(x, [rank - 1] + list(range(rank - 1)) + [rank])


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
    return conv_singular_values_batch([kernel], input_shape, strides, dilation_rate, groups)[0]


def conv_singular_values_batch(kernels, input_shape, strides=1, dilation_rate=1, groups=1):
    """`conv_singular_values` of several kernels of one shape and geometry, in one pass.

    Cheaper than a loop (a network has many layers of the same shape). Takes
    a list of kernels; returns a tensor of shape `(len(kernels), count)`, row
    b the sorted spectrum of `kernels[b]`.
    """
    stacked, count, geometry = _stack(kernels, input_shape, strides, dilation_rate, groups)
    out_dtype = stacked.dtype
    _, complex_dtype = _work_dtypes(out_dtype)
    # The transform keeps the kernel's precision; the decomposition runs in
    # complex128, since the Gram route squares the condition number.
    matrices = _forward(stacked, geometry, complex_dtype)
    values = _matrix_singular_values(matrices, use_svd=out_dtype == tf.float64)
    frequencies, per_frequency = values.shape[0], values.shape[1] * values.shape[2] // count
    values = tf.transpose(tf.reshape(values, (frequencies, count, per_frequency)), [1, 0, 2])
    repeats = tf.repeat(tf.constant(geometry.weights), per_frequency)
    values = tf.repeat(tf.reshape(values, (count, -1)), repeats, axis=1)
    return tf.cast(tf.sort(values, axis=-1, direction="DESCENDING"), out_dtype)


def conv_operator_norm(kernel, input_shape, strides=1, dilation_rate=1, groups=1):
    """The largest singular value of the layer's operator (circular boundary).

    Same arguments as `conv_singular_values`. Differentiable with respect to
    the kernel. Exact, not an estimate: cheap Gram-iteration bounds select the
    few frequencies that can hold the maximum, and only those are
    decomposed, by `eigvalsh` in complex128 (so this runs on a GPU too). The
    result has the kernel's dtype.
    """
    return conv_operator_norm_batch([kernel], input_shape, strides, dilation_rate, groups)[0]


def conv_operator_norm_batch(kernels, input_shape, strides=1, dilation_rate=1, groups=1):
    """`conv_operator_norm` of several kernels of one shape and geometry, in one
    pass; returns a tensor of shape `(len(kernels),)`. Differentiable."""
    stacked, count, geometry = _stack(kernels, input_shape, strides, dilation_rate, groups)
    _, complex_dtype = _work_dtypes(stacked.dtype)
    matrices = _forward(stacked, geometry, complex_dtype)
    return tf.cast(_largest_singular_values(matrices, count), stacked.dtype)


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
    return clip_conv_singular_values_batch([kernel], input_shape, max_norm, strides,
                                           dilation_rate, groups, method, iterations,
                                           tolerance)[0]


def clip_conv_singular_values_batch(kernels, input_shape, max_norm, strides=1, dilation_rate=1,
                                    groups=1, method=DEFAULT_METHOD, iterations=None,
                                    tolerance=DEFAULT_EXACT_TOLERANCE):
    """`clip_conv_singular_values` of several kernels of one shape and geometry.

    One pass for all of them (each kernel is projected on its own: the
    operators are independent). Returns a tensor of shape
    `(len(kernels), *kernel_shape)`. Kernels already inside are returned
    unchanged, each on its own.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}")
    max_norm = _check_max_norm(max_norm)
    stacked, count, geometry = _stack(kernels, input_shape, strides, dilation_rate, groups)
    if iterations is None:
        iterations = (DEFAULT_EXACT_MAX_ITERATIONS if method == "exact"
                      else DEFAULT_ALTERNATING_ITERATIONS)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got iterations={iterations!r}")
    if method == "exact" and geometry.folded:
        extent = tuple((k - 1) * r + 1 for k, r in zip(geometry.kernel_size,
                                                       geometry.dilation_rate))
        raise ValueError(
            f"method='exact' needs input_shape={geometry.input_shape} at least as large as "
            f"the dilated kernel {extent} on every axis; use method='alternating'")
    out_dtype = stacked.dtype
    real_dtype, complex_dtype = _work_dtypes(out_dtype)
    c_out = stacked.shape[-1] // count
    groups_per_kernel = geometry.groups // count

    def per_channel(values):  # (count,) -> broadcastable over the stacked kernel
        return tf.repeat(values, c_out)

    # The projection is positively homogeneous, so each kernel works on
    # kernel / max|kernel|: Gram matrices of a huge (diverged but finite)
    # kernel would overflow.
    original = tf.cast(stacked, real_dtype)
    scale = tf.reduce_max(tf.abs(tf.reshape(original, (-1, count, c_out))), axis=[0, 2])
    scale = _safe_scale(scale)
    work = original / per_channel(scale)
    bound = tf.cast(max_norm, real_dtype) / scale                      # (count,)
    matrix_bound = tf.repeat(bound, groups_per_kernel)[None, :]        # (1, count * groups)

    def norms_of(k):
        return _largest_singular_values(_forward(k, geometry, complex_dtype), count)

    def clip_once(k):
        return _inverse(_clip_matrices(_forward(k, geometry, complex_dtype), matrix_bound),
                        geometry, real_dtype)

    def rescale(k):
        norms = norms_of(k)
        return k * per_channel(tf.where(norms > bound, bound / norms, tf.ones_like(norms)))

    if method == "paper":
        return _unstack(tf.cast(clip_once(work) * per_channel(scale), out_dtype), count)

    def project():
        if method == "alternating":
            k = work
            for _ in range(int(iterations)):
                k = clip_once(k)
            projected = rescale(k)
        else:
            run = _dykstra_function(tuple(stacked.shape), geometry.input_shape,
                                    geometry.strides, geometry.dilation_rate, geometry.groups,
                                    real_dtype.name, int(iterations), float(tolerance))
            projected = rescale(run(work, matrix_bound))
        # Kernels inside stay the input itself, bit for bit.
        return tf.where(per_channel(inside), stacked,
                        tf.cast(projected * per_channel(scale), out_dtype))

    inside = norms_of(work) <= bound * (1 + _INSIDE_RTOL[real_dtype])
    result = tf.cond(tf.reduce_all(inside), lambda: tf.identity(stacked), project)
    return _unstack(result, count)


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
