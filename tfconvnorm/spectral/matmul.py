"""The training-time path: a certified operator-norm upper bound from matmuls only.

What runs inside a train step (the constraint with every method, the
regularizer) must compile under XLA (`jit_compile=True`, Keras' default on a
GPU): static shapes (no data-dependent gathers; a `cond` only between
branches of one shape), no batched complex `eigh` (27x slower under XLA on a
CPU, a loop of cuSOLVER calls on a GPU). This module is that second path,
written in `keras.ops`: the certified bound and the projections (below); the
exact `eigh` path (`linalg`, `spectra`, `projection`) stays for analysis and
the clipper, and is its reference in the tests.

The bound (Delattre et al. 2023, Gram iteration): for the Gram matrix G of a
per-frequency matrix P, lambda_max(G) <= ||G^(2^t)||_F^(1/2^t), within a
factor rank^(1/2^(t+1)) of it. Every frequency gets `_SCREEN_SQUARINGS`
squarings (one more for matrices wider than `_SCREEN_EXTRA_ABOVE`); the
`_REFINED` matrices of the operator with the largest bounds (`top_k`: a
static shape) get `_REFINE_SQUARINGS` more. The result is the
largest of the refined bounds and of the coarse bounds of the rest, so it
holds whichever frequencies were picked. Hermitian squarings take two real
matmuls (R I and (R + I)(R - I), with R symmetric and I antisymmetric).

Rounding: the bound holds as computed. Each step's rounding error is bounded
in the standard model (|fl(a b) - a b| <= gamma_n |a| |b|, gamma_n = n u /
(1 - n u)) and added outward: the transform's error (absolute, from ||k||_F),
the Gram matrix's (absolute, from its trace; long inner products summed in
chunks, `_inner_chunks`, so that gamma counts about 2 sqrt(L) terms, not L),
and each squaring's (relative to the computed lower bound of that power; the
first squarings of wide matrices bound |R| + |I| by its row sums, far below
its Frobenius norm for flat spectra). `u` is the unit
roundoff of the working dtype (float32 for float32 and narrower kernels,
float64 for float64); where TensorFlow may run float32 matmuls in TF32 (a
visible GPU with TF32 enabled), `u` is TF32's, which keeps the bound certified
but looser: turn TF32 off (`tf.config.experimental.enable_tensor_float_32_
execution(False)`) for tight bounds on such GPUs.
"""

import math

import keras
from keras import ops
import numpy as np

from tfconvnorm.spectral.operator import Geometry, prepare_kernel

#: Squarings of every frequency's Gram matrix (the coarse bounds), and one
#: more above this matrix size, where the tops of many wide random matrices
#: crowd beyond what refining `_REFINED` of them settles (BENCHMARKS.md).
_SCREEN_SQUARINGS = 3
_SCREEN_EXTRA_ABOVE = 64
#: Matrices per operator refined further, and their extra squarings.
_REFINED = 4
_REFINE_SQUARINGS = 4
#: Squarings whose rounding allowance uses row sums (`_Powers._step`).
_ROW_SUM_SQUARINGS = 2
#: ... and only where the plain allowance, about 12 gamma_(n+2) sqrt(n) of a flat
#: spectrum's top, would exceed this (float32 from n ~ 128; never in float64).
_ROW_SUM_ALLOWANCE = 1e-3


def _unit_roundoff(dtype_name):
    if dtype_name == "float64":
        return 2.0 ** -53
    if _tf32_possible():
        return 2.0 ** -11  # TF32 rounds matmul inputs to 10 mantissa bits
    return 2.0 ** -24


def _tf32_possible():
    """True where TensorFlow may run float32 matmuls in TF32."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return (tf.config.experimental.tensor_float_32_execution_enabled()
            and bool(tf.config.list_physical_devices("GPU")))


def _gamma(n, u):
    return n * u / (1 - n * u)


def backend_kernel(value, name="kernel"):
    """`value` (a Keras variable, a tensor of Keras' backend, an array) as a
    tensor of the backend in the working dtype, and its own dtype name (to
    cast results back to).

    Non-finite entries raise where the backend can tell before computing:
    TensorFlow in eager mode and in graphs (`InvalidArgumentError`; under XLA
    the check compiles to nothing), JAX outside `jit` and PyTorch
    (`ValueError`). Inside a compiled JAX step a NaN kernel (already written
    by the optimizer) stays NaN, as under XLA.
    """
    if isinstance(value, keras.Variable):
        value = value.value
    backend = keras.backend.backend()
    if backend == "tensorflow":
        kernel = prepare_kernel(value, name)
        return ops.cast(kernel, work_dtype(kernel.dtype)), kernel.dtype.name
    kernel = ops.convert_to_tensor(value)
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    if not (dtype.startswith("float") or dtype.startswith("bfloat")):
        if not dtype.startswith(("int", "uint")):
            raise TypeError(f"{name} must be real floating point, got dtype {dtype}")
        dtype = "float32"
    if _concrete(kernel) and not np.all(np.isfinite(ops.convert_to_numpy(
            ops.cast(kernel, "float32" if dtype != "float64" else dtype)))):
        raise ValueError(f"{name} has NaN or Inf entries; refusing to compute a spectrum "
                         "of it")
    return ops.cast(kernel, work_dtype(dtype)), dtype


def _concrete(tensor):
    """Whether `tensor` holds values now (not a tracer of a compiled function)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        return not isinstance(tensor, jax.core.Tracer)
    if backend == "torch":
        import torch  # pylint: disable=import-outside-toplevel
        return not torch.compiler.is_compiling()
    return backend == "numpy"


def work_dtype(dtype):
    """The dtype the bound computes in: float64 for float64, float32 otherwise."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def forward_parts(kernel, geometry):
    """Real and imaginary parts of the per-frequency matrices P(w)^T, shape
    (frequencies * groups, cols, rows), by one matmul with the combined DFT
    factors (`operator._combined_factors`); `kernel` in the working dtype."""
    g = geometry
    if g.combined is None:
        # Very large 3-D inputs: the per-axis contractions (TensorFlow ops with
        # static shapes, so they compile under XLA too).
        from tfconvnorm.spectral import transforms  # pylint: disable=import-outside-toplevel
        real, imag = transforms.forward_parts(kernel, g, kernel.dtype)
        shape = (g.num_frequencies * g.groups, g.cols, g.rows)
        return ops.reshape(real, shape), ops.reshape(imag, shape)
    x = ops.reshape(kernel, (g.taps, g.c_in_group, g.groups, g.c_out_group))
    if g.groups > 1:
        x = ops.transpose(x, (0, 2, 1, 3))
    factors = ops.convert_to_tensor(g.combined[0], dtype=kernel.dtype)
    x = ops.matmul(factors, ops.reshape(x, (g.taps, -1)))
    x = ops.reshape(x, (2, g.num_frequencies, g.phases, g.groups, g.c_in_group, g.c_out_group))
    if g.groups > 1 and g.phases > 1:
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    x = ops.reshape(x, (2, g.num_frequencies * g.groups, g.cols, g.rows))
    return x[0], x[1]


#: Largest (batch * chunks * n * n) for which `_gram` sums its inner
#: products in chunks (`_inner_chunks`): the chunked Gram matrices are held
#: at once.
_CHUNKED_GRAM_MAX_ENTRIES = 1 << 22
#: Smallest (inner length * n) chunked: below it the unchunked allowance,
#: about 3 L n u / 4 of lambda_max for a random matrix, is under 1e-3 in
#: float32 and chunking (slower small matmuls) would not pay.
_CHUNKED_GRAM_MIN_SIZE = 1 << 14


def _inner_chunks(length, batch, n):
    """How many chunks `_gram` splits an inner dimension of `length` into.

    A dot product of length L computed in any order errs by at most gamma_L
    times the sum of |terms| (the order XLA, oneDNN or cuBLAS pick is not
    known). Summed as k dot products of length b = ceil(L / k) whose results
    are then added (in any order), the bound is gamma_(b + k - 1): with
    k ~ sqrt(L), 1280-wide 1x1 convs get a float32 rounding allowance of
    0.1% instead of 3% of their norm. Same arithmetic; k Gram matrices held
    at once, so only where they fit `_CHUNKED_GRAM_MAX_ENTRIES`."""
    if length * n < _CHUNKED_GRAM_MIN_SIZE:  # the allowance is small already
        return 1
    chunks = max(1, int(math.isqrt(length)))
    while chunks > 1 and batch * chunks * n * n > _CHUNKED_GRAM_MAX_ENTRIES:
        chunks //= 2
    return chunks


def _gram_length(length, chunks):
    """The accumulation length whose gamma bounds a chunked dot product."""
    return -(-length // chunks) + chunks - 1


def _chunked_inner(a, b, chunks):
    """a^T b (batch, L, n) x (batch, L, p) summed over `chunks` pieces of L."""
    if chunks == 1:
        return ops.matmul(ops.swapaxes(a, -1, -2), b)
    batch, length = a.shape[0], a.shape[1]
    size = -(-length // chunks)
    pad = size * chunks - length
    if pad:  # zero rows add exact zeros
        a = ops.pad(a, ((0, 0), (0, pad), (0, 0)))
        b = ops.pad(b, ((0, 0), (0, pad), (0, 0)))
    a = ops.reshape(a, (batch, chunks, size, a.shape[-1]))
    b = ops.reshape(b, (batch, chunks, size, b.shape[-1]))
    return ops.sum(ops.matmul(ops.swapaxes(a, -1, -2), b), axis=1)


def _gram(real, imag, chunks=1):
    """Parts of the smaller Gram matrix of A = real + i imag (batch, m, n):
    A^H A if n <= m, else A A^H; two real matmuls (the real part as one
    matmul of the stacked parts, the antisymmetric imaginary part X - X^T).
    `chunks`: sum the inner products in that many pieces (`_inner_chunks`)."""
    m, n = real.shape[-2:]
    if n > m:
        real, imag = ops.swapaxes(real, -1, -2), -ops.swapaxes(imag, -1, -2)
    stacked = ops.concatenate([real, imag], axis=-2)
    gram_real = _chunked_inner(stacked, stacked, chunks)
    mixed = _chunked_inner(real, imag, chunks)
    return gram_real, mixed - ops.swapaxes(mixed, -1, -2)


def _hermitian_square(real, imag):
    """Parts of H^2 for Hermitian H = real + i imag, in two real matmuls:
    with M1 = R I and M2 = (R + I)(R - I), Re H^2 = M2 + M1 + M1^T and
    Im H^2 = M1 - M1^T (R symmetric, I antisymmetric)."""
    m1 = ops.matmul(real, imag)
    m2 = ops.matmul(real + imag, real - imag)
    m1t = ops.swapaxes(m1, -1, -2)
    square_real = m2 + m1 + m1t
    # Symmetrise: the next step's identity needs exact symmetry.
    square_real = (square_real + ops.swapaxes(square_real, -1, -2)) / 2
    return square_real, m1 - m1t


def _frobenius(real, imag):
    return ops.sqrt(ops.sum(ops.square(real) + ops.square(imag), axis=(-2, -1)))


def _slack(n, u):
    """Relative allowance of the lower bounds below: the rounding of a
    Frobenius norm, a normalisation and a Rayleigh quotient of n x n matrices."""
    return 1e-3 + 4 * _gamma(n + 2, u)


def _lower_bound(estimate, n, u):
    """A lower bound on lambda_max of a PSD n x n matrix with Frobenius norm 1
    from an estimate of it (rounding slack off): never below 1 / sqrt(n) (sum
    of squared eigenvalues 1), never above 1."""
    return ops.minimum(ops.maximum(estimate, 1.0 / math.sqrt(n)) * (1 - _slack(n, u)), 1.0)


def _rayleigh(real, imag, n, u):
    """A lower bound on lambda_max of the PSD matrix real + i imag with
    Frobenius norm 1: the Rayleigh quotient at H^(1/2) e_k, ||H e_k||^2 / H_kk,
    at its best k, and never below 1 / sqrt(n) (sum of squared eigenvalues 1)."""
    columns = ops.sum(ops.square(real) + ops.square(imag), axis=-2)
    # The diagonal through an identity mask: Keras' ops.diagonal / ops.trace
    # with negative axes fail in TensorFlow graphs before Keras 3.5.
    diagonal = ops.sum(real * ops.eye(real.shape[-1], dtype=real.dtype), axis=-2)
    quotient = ops.max(ops.where(diagonal > 0, columns / ops.maximum(diagonal, 1e-30), 0.0),
                       axis=-1)
    return _lower_bound(quotient, n, u)


class _Powers:
    """Normalised Gram powers of a batch and the log of their certified bound.

    After j squarings, log_bound = sum_i log(c_i (1 + delta_i)) / 2^i, with
    c_i the Frobenius norm of the i-th computed square S_i (before
    normalising, H_i = S_i / c_i) and delta_i its rounding allowance e_i
    relative to a lower bound L_i on lambda_max(H_i); lambda_max(H_0) <=
    exp(log_bound) * (1 + n u)^(1/2^j) (see the module docstring).

    L_i comes free from the next square: for Hermitian H with ||H||_F = 1,
    ||H^2||_F^2 = sum lambda^4 <= lambda_max^2, so L_i = c_{i+1} - e_{i+1}
    (less a slack for the normalisation's rounding), never below 1 / sqrt(n);
    only the last square, which has no next one, takes a Rayleigh quotient
    (`bound`). Until then its term waits in `pending` = (e_i / c_i, 1 / 2^i).
    (One Rayleigh quotient per bound instead of one per squaring: eager
    backends pay per op.)"""

    def __init__(self, real, imag, log_bound, steps, n, u, pending=None):
        self.real, self.imag, self.log_bound, self.steps = real, imag, log_bound, steps
        self.n, self.u = n, u
        zero = ops.zeros_like(log_bound)
        self.pending = (zero, zero) if pending is None else pending

    def _step(self, real, imag, log_bound, pending_ratio, pending_weight, weight,
              row_sums=False):
        """One squaring; `weight` = 1 / 2^(steps after it)."""
        n, u = self.n, self.u
        # The product's error is <= 6 gamma_(n+2) |||R| + |I|||_2^2 (two real
        # matmuls and their sums, entrywise against (|R| + |I|)^2), and the
        # spectral norm of that non-negative symmetric matrix is at most
        # both its Frobenius norm (sqrt 2, as ||H||_F = 1) and its largest
        # row sum. The row sums are far smaller only for the flat spectra of
        # the first squarings (wide random matrices), so only those pay the
        # extra ops (`_ROW_SUM_SQUARINGS`; eager and non-XLA graphs pay per op).
        spread = 2.0
        if row_sums and 12 * _gamma(n + 2, u) * math.sqrt(n) > _ROW_SUM_ALLOWANCE:
            rows = ops.max(ops.sum(ops.abs(real) + ops.abs(imag), axis=-1), axis=-1)
            spread = ops.minimum(ops.square(rows) * (1 + 3 * _gamma(n, u)), 2.0)  # sums' rounding
        real, imag = _hermitian_square(real, imag)
        c = ops.maximum(_frobenius(real, imag), 1e-30)
        error = 6 * _gamma(n + 2, u) * spread + 2 * u * c
        # The previous square's term, now that its lower bound is known.
        lower = _lower_bound(c - error, n, u)
        log_bound = log_bound + ops.log1p(pending_ratio / lower) * pending_weight
        real, imag = real / c[:, None, None], imag / c[:, None, None]
        log_bound = log_bound + ops.log(c) * weight
        return real, imag, log_bound, error / c, ops.zeros_like(c) + weight

    def _state(self):
        return (self.real, self.imag, self.log_bound) + tuple(self.pending)

    def _from_state(self, state, steps):
        return _Powers(*state[:3], steps, self.n, self.u, pending=tuple(state[3:]))

    def squared(self):
        steps = self.steps + 1
        return self._from_state(self._step(*self._state(), 0.5 ** steps,
                                           row_sums=self.steps < _ROW_SUM_SQUARINGS), steps)

    def squared_times(self, count):
        """`count` squarings, those after the first `_ROW_SUM_SQUARINGS` in one
        loop (a small graph, quick to compile)."""
        while count and self.steps < _ROW_SUM_SQUARINGS:
            self, count = self.squared(), count - 1  # pylint: disable=self-cls-assignment
        if not count:
            return self
        dtype = self.real.dtype

        def body(i, state):
            weight = ops.power(ops.cast(0.5, dtype), ops.cast(i + self.steps + 1, dtype))
            return self._step(*state, weight)

        state = ops.fori_loop(0, count, body, self._state())
        return self._from_state(state, self.steps + count)

    def bound(self):
        """Upper bound on lambda_max(H_0), per matrix."""
        ratio, weight = self.pending
        log_bound = self.log_bound
        if self.steps:
            rayleigh = _rayleigh(self.real, self.imag, self.n, self.u)
            log_bound = log_bound + ops.log1p(ratio / rayleigh) * weight
        return ops.exp(log_bound + math.log1p(2 * self.n * self.u) / 2 ** self.steps)

    def take(self, indices):
        pick = lambda x: ops.take(x, indices, axis=0)  # noqa: E731
        return _Powers(pick(self.real), pick(self.imag), pick(self.log_bound), self.steps,
                       self.n, self.u, pending=tuple(pick(p) for p in self.pending))


def norm_upper_bound(kernel, geometry, u=None, squarings=None):
    """A certified upper bound on the norm of the circular operator `geometry`
    describes (for a zero-padded layer: the operator on its embedding size N,
    which bounds the layer), from matmuls with static shapes only.

    `kernel` is in the conv layout, as a tensor in the working dtype; the
    bound has that dtype. Differentiable (the gradient of the bound, not of
    the exact norm). Its ratio to the exact norm: BENCHMARKS.md.

    `squarings=None` selects (see the module docstring). An int squares
    every frequency that often instead: what a projected kernel needs, whose
    clipped frequencies all share the same top, with multiplicity r, which
    a bound after t squarings overstates by r^(1 / 2^(t+1)).
    """
    g = geometry
    dtype = kernel.dtype
    u = _unit_roundoff(work_dtype(dtype)) if u is None else u
    # Scale to max |entry| 1 (positively homogeneous): powers of Gram
    # matrices of a huge kernel would overflow.
    scale = ops.stop_gradient(ops.max(ops.abs(kernel)))
    scale = ops.where(scale > 0, scale, ops.ones_like(scale))
    k = kernel / scale
    real, imag = forward_parts(k, g)
    m, n = real.shape[-2:]
    inner, n = max(m, n), min(m, n)
    # The transform's rounding: |E(w)| <= gamma * sum_t |k_t| entrywise, so
    # ||E(w)||_2 <= gamma * sqrt(taps) * ||k||_F at every frequency.
    transform_error = (_gamma(2 * g.taps + 2, u) * math.sqrt(g.taps)
                       * ops.sqrt(ops.sum(ops.square(k))))
    if n == 1:  # rows or columns: the Frobenius norm is the norm
        sigma = ops.max(_frobenius(real, imag)) * (1 + 2 * inner * u)
        return (sigma + transform_error) * scale * (1 + 4 * u)
    chunks = _inner_chunks(2 * inner, int(real.shape[0]), n)
    gram_real, gram_imag = _gram(real, imag, chunks)
    trace = ops.sum(gram_real * ops.eye(n, dtype=gram_real.dtype), axis=(-2, -1))  # see _rayleigh
    s0 = ops.maximum(_frobenius(gram_real, gram_imag), 1e-30)
    powers = _Powers(gram_real / s0[:, None, None], gram_imag / s0[:, None, None],
                     ops.zeros_like(s0), 0, n, u)
    if squarings is not None:
        powers = powers.squared_times(squarings)
        lam = powers.bound() * s0
    elif int(real.shape[0]) <= _REFINED:
        # Few matrices (1x1 convs, Dense): square them all as often as a
        # projected kernel, for the crowded tops of wide random matrices
        # (MobileNetV2's 1280-wide 1x1 conv; BENCHMARKS.md).
        powers = powers.squared_times(_PROJECTED_SQUARINGS)
        lam = powers.bound() * s0
    else:
        for _ in range(_SCREEN_SQUARINGS + (n > _SCREEN_EXTRA_ABOVE)):
            powers = powers.squared()
        # The refined matrices: the largest coarse bounds (times s0: the
        # bound on lambda_max(G) itself). The rest keep their coarse bound.
        values, indices = ops.top_k(powers.bound() * s0, _REFINED + 1)
        refined = powers.take(indices[:_REFINED])
        for _ in range(_REFINE_SQUARINGS):
            refined = refined.squared()
        lam = ops.concatenate([refined.bound() * ops.take(s0, indices[:_REFINED]),
                               values[_REFINED:]])
    # The Gram matrix's rounding, added for every matrix (largest trace).
    gram_error = 3 * _gamma(_gram_length(2 * inner, chunks), u) * trace
    lam = lam * (1 + 4 * u)
    top = ops.max(lam) + ops.max(gram_error) * (1 + 2 * u)
    sigma = ops.sqrt(top) * (1 + 2 * u)
    return (sigma + transform_error) * scale * (1 + 4 * u)


def geometry_of(kernel_shape, **spectral_args):
    """`operator.Geometry` of a kernel shape and `conv_singular_values`' keyword
    arguments (validated there)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return Geometry(tf.TensorShape(tuple(int(d) for d in kernel_shape)), **spectral_args)


def conv_operator_norm_upper_bound(kernel, input_shape, strides=1, dilation_rate=1, groups=1,
                                   padding="circular"):
    """Certified upper bound on `conv_operator_norm(kernel, ...)` (for a zero
    padding, on the real layer's norm), computed from matmuls with static
    shapes: compiles under XLA and runs inside a train step. Same arguments
    as `conv_operator_norm`; float64 kernels compute in float64, others in
    float32, and the bound holds as computed in that dtype (rounding
    allowances added outward; see `tfconvnorm.spectral.matmul`). Typically
    within 1% of the exact norm (BENCHMARKS.md).
    """
    kernel = prepare_kernel(kernel)
    dtype = work_dtype(kernel.dtype)
    geometry = geometry_of(kernel.shape, input_shape=input_shape, strides=strides,
                           dilation_rate=dilation_rate, groups=groups, padding=padding)
    return norm_upper_bound(ops.cast(kernel, dtype), geometry)


def rescale_factor(kernel, bound, max_norm, out_dtype):
    """min(1, max_norm / bound), shrunk so that the rescaled kernel rounded to
    `out_dtype` is still within max_norm: rounding each entry by u moves the
    operator by at most u * sqrt(taps) * ||k||_F (a sum over taps of shifts)."""
    u = {"float64": 2.0 ** -53, "float32": 2.0 ** -24, "float16": 2.0 ** -11,
         "bfloat16": 2.0 ** -8}.get(str(out_dtype).split(".")[-1], 2.0 ** -24)
    taps = int(np.prod(kernel.shape[:-2])) if len(kernel.shape) > 2 else 1
    # Scaled by max|k|: the sum of squares of a huge kernel overflows.
    peak = ops.maximum(ops.max(ops.abs(kernel)), 1e-30)
    frobenius = ops.sqrt(ops.sum(ops.square(kernel / peak))) * peak
    padded = bound + (u * math.sqrt(taps)) * frobenius
    return ops.where(bound <= max_norm, ops.ones_like(bound),
                     max_norm / ops.maximum(padded, 1e-30) * (1 - 4 * u))


# --- The projections: the clip by matrix iterations with a fixed count -------
#
# clip(W) sets every singular value of W above 1 to 1. With W = Q Z its polar
# decomposition (Z = (W^H W)^(1/2)) and S = sign(Z - I):
#   clip(W) = Q min(Z, I) = Q (Z + I - (Z - I) S) / 2 = (W + Q - (W - Q) S) / 2.
# Q and S come from scaled Newton-Schulz iterations (Chen & Chow 2014: x ->
# a x (3 - a^2 x^2) / 2, a chosen from the interval's lower end), matmuls
# only. The result is continuous in how well they converged: an eigenvalue of
# Z - I near 0, where the sign converges last, contributes
# |sigma - 1| (1 - |s|) / 2, which vanishes with sigma - 1. Q only matters
# where S is near +1 (sigma >= 1), so it needs to converge for singular values
# down to 1 / beta only. The schedules below converge from 1e-3 (polar:
# kernels up to 1000x over the bound) and 1e-4 (sign); measured against
# `eigh`, the clipped kernels agree to about 1e-6 relative in float32
# (tests/test_matmul_path.py). A kernel further above the bound (a diverged
# run) gets a clip that is not the projection's; whatever the accuracy, the
# methods that promise the bound end with the certified rescale.

#: Squarings of every frequency in the certified bound after a projection
#: (clipped tops tie: with multiplicity 512 the bound is 0.04% over).
_PROJECTED_SQUARINGS = 12
#: Lower ends the polar and sign schedules converge from.
_POLAR_FROM = 1e-3
_SIGN_FROM = 1e-4


def _schedule(lower, dtype_name):
    """Chen-Chow scalings a_k of the Newton-Schulz steps that map [lower, 1]
    onto [1 - tol, 1] (tol about the dtype's precision): a fixed, static
    count."""
    tol = 1e-15 if dtype_name == "float64" else 1e-7
    alphas, low = [], lower
    while 1 - low > tol:
        a = math.sqrt(3 / (1 + low + low * low))
        alphas.append(a)
        low = a * low * (3 - a * a * low * low) / 2
    return tuple(alphas)


def _iterate(step, alphas, state):
    """state <- step(alpha, state) for each alpha, as one loop: unrolled, two
    dozen iterations per layer made XLA compile a model for minutes."""
    alphas = np.asarray(alphas)

    def body(i, state):
        alpha = ops.take(ops.convert_to_tensor(alphas, dtype=state[0].dtype), i)
        return step(alpha, state)

    return ops.fori_loop(0, len(alphas), body, state)


def _cmatmul(a, b):
    """Complex product of (real, imag) pairs of batched matrices, as one real
    matmul with the 2x2-block embedding of b: [ar ai] [[br bi], [-bi br]]."""
    (ar, ai), (br, bi) = a, b
    n = br.shape[-1]
    right = ops.concatenate([ops.concatenate([br, bi], axis=-1),
                             ops.concatenate([-bi, br], axis=-1)], axis=-2)
    out = ops.matmul(ops.concatenate([ar, ai], axis=-1), right)
    return out[..., :n], out[..., n:]


def _adjoint(a):
    return ops.swapaxes(a[0], -1, -2), -ops.swapaxes(a[1], -1, -2)


def _hermitian_part(a):
    return ((a[0] + ops.swapaxes(a[0], -1, -2)) / 2,
            (a[1] - ops.swapaxes(a[1], -1, -2)) / 2)


def _newton_schulz_factor(gram, alpha, eye):
    """a (3 I - a^2 G) / 2 for Hermitian G: the step x -> a x (3 - a^2 x^2) / 2
    is W -> W times this (G = W^H W), or S -> S times this (G = S^2)."""
    return (alpha * (3 * eye - alpha * alpha * gram[0]) / 2,
            -(alpha ** 3 / 2) * gram[1])


def clip_parts(real, imag):
    """Every singular value above 1 of the matrices real + i imag (batch, m, n)
    set to 1, up to the iterations' accuracy (see above); same shapes."""
    dtype_name = work_dtype(real.dtype)
    m, n = real.shape[-2:]
    if n > m:  # iterate on the smaller Gram side
        out = clip_parts(*_adjoint((real, imag)))
        return _adjoint(out)
    w = (real, imag)
    eye = ops.eye(n, dtype=real.dtype)
    # beta >= sigma_max (an estimate, 1% over: it needs not be certified),
    # from 3 Gram squarings of W / max|W| (the Gram matrix of a matrix far
    # above the bound would overflow).
    peak = ops.maximum(ops.max(ops.maximum(ops.abs(real), ops.abs(imag)), axis=(-2, -1)), 1e-30)
    gram = _gram(real / peak[:, None, None], imag / peak[:, None, None])
    s0 = ops.maximum(_frobenius(*gram), 1e-30)
    powers = _Powers(gram[0] / s0[:, None, None], gram[1] / s0[:, None, None],
                     ops.zeros_like(s0), 0, n, 0.0)
    for _ in range(3):
        powers = powers.squared()
    beta = ops.maximum(ops.sqrt(powers.bound() * s0) * peak * 1.01, 1.0)[:, None, None]
    # Polar factor Q of W / beta (singular values in [0, 1]).
    def polar_step(alpha, q):
        return _cmatmul(q, _newton_schulz_factor(_gram(*q), alpha, eye))

    q = _iterate(polar_step, _schedule(_POLAR_FROM, dtype_name), (real / beta, imag / beta))
    # Z = Q^H W = (W^H W)^(1/2) and S = sign(Z - I), from (Z - I) / ||Z - I||.
    z = _hermitian_part(_cmatmul(_adjoint(q), w))
    spread = ops.maximum(beta - 1, 1.0) * 1.01

    def sign_step(alpha, s):
        return _hermitian_part(_cmatmul(s, _newton_schulz_factor(_hermitian_square(*s), alpha,
                                                                  eye)))

    s = _iterate(sign_step, _schedule(_SIGN_FROM, dtype_name),
                 ((z[0] - eye) / spread, z[1] / spread))
    diff = _cmatmul((w[0] - q[0], w[1] - q[1]), s)
    return (w[0] + q[0] - diff[0]) / 2, (w[1] + q[1] - diff[1]) / 2


def inverse_parts(real, imag, geometry):
    """The least-squares kernel (same support) of conjugate-symmetric
    per-frequency matrices in `forward_parts`' layout, in their dtype."""
    g = geometry
    if g.combined is None:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        from tfconvnorm.spectral import transforms  # pylint: disable=import-outside-toplevel
        shape = (g.num_frequencies, g.groups, g.cols, g.rows)
        matrices = tf.complex(tf.reshape(real, shape), tf.reshape(imag, shape))
        return transforms.inverse(matrices, g, real.dtype)
    x = ops.reshape(ops.stack([real, imag]),
                    (2, g.num_frequencies, g.groups, g.phases, g.c_in_group, g.c_out_group))
    if g.groups > 1 and g.phases > 1:
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    x = ops.reshape(x, (2 * g.num_frequencies * g.phases, g.c_in_group * g.c_out))
    x = ops.matmul(ops.convert_to_tensor(g.combined[1], dtype=real.dtype), x)
    x = ops.reshape(x, (g.taps, g.groups, g.c_in_group, g.c_out_group))
    if g.groups > 1:
        x = ops.transpose(x, (0, 2, 1, 3))
    return ops.reshape(x, tuple(g.kernel_size) + (g.c_in_group, g.c_out))


def _clip_kernel(kernel, geometry, bound):
    """One clip at `bound` and the cut back to the support."""
    real, imag = forward_parts(kernel, geometry)
    real, imag = clip_parts(real / bound, imag / bound)
    return inverse_parts(real * bound, imag * bound, geometry)


def _dykstra(kernel, geometry, bound, max_iterations, tolerance):
    """Dykstra's algorithm between the norm ball (the clip) and the support
    (the cut back); the support being linear, only the clip needs a
    correction. A while loop with static shapes (compiles under XLA)."""
    zero = ops.zeros((geometry.num_frequencies * geometry.groups, geometry.cols,
                      geometry.rows), dtype=kernel.dtype)

    def body(i, k, corr_real, corr_imag, _):
        real, imag = forward_parts(k, geometry)
        real, imag = real + corr_real, imag + corr_imag
        clip_real, clip_imag = clip_parts(real / bound, imag / bound)
        clip_real, clip_imag = clip_real * bound, clip_imag * bound
        new_k = inverse_parts(clip_real, clip_imag, geometry)
        change = (ops.sqrt(ops.sum(ops.square(new_k - k)))
                  / ops.maximum(ops.sqrt(ops.sum(ops.square(new_k))), 1e-30))
        return i + 1, new_k, real - clip_real, imag - clip_imag, change

    def cond(i, k, corr_real, corr_imag, change):
        return ops.logical_and(i < max_iterations, change > tolerance)

    start = (ops.convert_to_tensor(0, dtype="int32"), kernel, zero, zero,
             ops.convert_to_tensor(np.inf, dtype=kernel.dtype))
    return ops.while_loop(cond, body, start)[1]


def project(kernel, geometry, max_norm, method, iterations=None, tolerance=1e-7,
            out_dtype=None):
    """`clip_conv_singular_values(kernel, ..., method=method)` on the matmul
    path: static shapes, matrix iterations with fixed counts (Dykstra's loop
    for "exact" is a while loop), compiles under XLA.

    `kernel` in the conv layout and the working dtype (`work_dtype`); the
    result in `out_dtype` (default the kernel's). "rescale", "alternating"
    and "exact" end with the certified rescale (`rescale_factor`), so the
    bound holds as computed whatever the iterations' accuracy; a kernel
    whose certified bound is already within `max_norm` comes back unchanged.
    "paper" is the published single clip and cut back, as on the `eigh` path
    (no guarantee); a kernel certified inside comes back unchanged.
    """
    # Imported here: projection.py imports TensorFlow at module level.
    from tfconvnorm.spectral import projection  # pylint: disable=import-outside-toplevel
    g = geometry
    out_dtype = kernel.dtype if out_dtype is None else out_dtype
    max_norm = ops.cast(max_norm, kernel.dtype)
    if method == "exact" and g.folded:
        extent = tuple((k - 1) * r + 1 for k, r in zip(g.kernel_size, g.dilation_rate))
        raise ValueError(f"method='exact' needs an input (for a zero padding, the circular "
                         f"embedding) of size {g.input_shape} at least as large as the "
                         f"dilated kernel {extent} on every axis; use method='alternating'")
    # Positively homogeneous: work on kernel / max|kernel| (no overflow in
    # the Gram matrices of a huge kernel).
    scale = ops.max(ops.abs(kernel))
    scale = ops.where(scale > 0, scale, ops.ones_like(scale))
    work = kernel / scale
    bound = max_norm / scale
    if method == "paper":
        # Inside, the clip and the cut back are the identity; computed, the
        # clip's formula keeps singular values far below the bound only to
        # about u times the bound (a kernel 1e-30 of the bound would lose
        # every digit), so a kernel certified inside is returned as it is.
        return ops.cond(norm_upper_bound(work, g) <= bound, lambda: ops.cast(kernel, out_dtype),
                        lambda: ops.cast(_clip_kernel(work, g, bound) * scale, out_dtype))
    if method == "rescale":
        return ops.cast(kernel * rescale_factor(kernel, norm_upper_bound(kernel, g), max_norm,
                                                out_dtype), out_dtype)
    if method == "alternating":
        rounds = projection.DEFAULT_ALTERNATING_ITERATIONS if iterations is None else iterations

        def projected():
            return ops.fori_loop(0, int(rounds), lambda i, k: _clip_kernel(k, g, bound), work)
    elif method == "exact":
        cap = projection.DEFAULT_EXACT_MAX_ITERATIONS if iterations is None else iterations

        def projected():
            return _dykstra(work, g, bound, int(cap), ops.cast(tolerance, work.dtype))
    else:
        raise ValueError(f"unknown method={method!r}")

    def certified():
        k = projected() * scale
        bound = norm_upper_bound(k, g, squarings=_PROJECTED_SQUARINGS)
        factor = rescale_factor(k, bound, max_norm, out_dtype)
        return ops.cast(k * factor, out_dtype)

    # With every frequency squared: our own output, whose clipped tops tie,
    # must count as inside (selection would overstate its norm by up to 15%).
    inside = norm_upper_bound(work, g, squarings=_PROJECTED_SQUARINGS) <= bound
    return ops.cond(inside, lambda: ops.cast(kernel, out_dtype), certified)
