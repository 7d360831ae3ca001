"""The training-time path: a certified operator-norm upper bound from matmuls only.

What runs inside a train step (the default `rescale` constraint, the
regularizer) must compile under XLA (`jit_compile=True`, Keras' default on a
GPU): static shapes, no data-dependent gathers or `tf.cond`, no batched
complex `eigh` (27x slower under XLA on a CPU, a loop of cuSOLVER calls on a
GPU). This module is that second path, written in `keras.ops`; the exact
`eigh` path (`linalg`, `spectra`) stays for analysis and is its reference in
the tests.

The bound (Delattre et al. 2023, Gram iteration): for the Gram matrix G of a
per-frequency matrix P, lambda_max(G) <= ||G^(2^t)||_F^(1/2^t), within a
factor rank^(1/2^(t+1)) of it. Every frequency gets `_SCREEN_SQUARINGS`
squarings; the `_REFINED` matrices of the operator with the largest bounds
(`top_k`: a static shape) get `_REFINE_SQUARINGS` more. The result is the
largest of the refined bounds and of the coarse bounds of the rest, so it
holds whichever frequencies were picked. Hermitian squarings take two real
matmuls (R I and (R + I)(R - I), with R symmetric and I antisymmetric).

Rounding: the bound holds as computed. Each step's rounding error is bounded
in the standard model (|fl(a b) - a b| <= gamma_n |a| |b|, gamma_n = n u /
(1 - n u)) and added outward: the transform's error (absolute, from ||k||_F),
the Gram matrix's (absolute, from its trace), and each squaring's (relative
to the computed Rayleigh lower bound of that power). `u` is the unit
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

#: Squarings of every frequency's Gram matrix (the coarse bounds).
_SCREEN_SQUARINGS = 3
#: Matrices per operator refined further, and their extra squarings.
_REFINED = 4
_REFINE_SQUARINGS = 4


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


def work_dtype(dtype):
    """The dtype the bound computes in: float64 for float64, float32 otherwise."""
    return "float64" if str(dtype).endswith("float64") else "float32"


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


def _gram(real, imag):
    """Parts of the smaller Gram matrix of A = real + i imag (batch, m, n):
    A^H A if n <= m, else A A^H; two real matmuls (the real part as one
    matmul of the stacked parts, the antisymmetric imaginary part X - X^T)."""
    m, n = real.shape[-2:]
    if n > m:
        real, imag = ops.swapaxes(real, -1, -2), -ops.swapaxes(imag, -1, -2)
    stacked = ops.concatenate([real, imag], axis=-2)
    gram_real = ops.matmul(ops.swapaxes(stacked, -1, -2), stacked)
    mixed = ops.matmul(ops.swapaxes(real, -1, -2), imag)
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


def _rayleigh(real, imag, n, slack):
    """A lower bound on lambda_max of the PSD matrix real + i imag with
    Frobenius norm 1: the Rayleigh quotient at H^(1/2) e_k, ||H e_k||^2 / H_kk,
    at its best k, and never below 1 / sqrt(n) (sum of squared eigenvalues 1)."""
    columns = ops.sum(ops.square(real) + ops.square(imag), axis=-2)
    diagonal = ops.diagonal(real, axis1=-2, axis2=-1)
    quotient = ops.max(ops.where(diagonal > 0, columns / ops.maximum(diagonal, 1e-30), 0.0),
                       axis=-1)
    return ops.minimum(ops.maximum(quotient, 1.0 / math.sqrt(n)) * (1 - slack), 1.0)


class _Powers:
    """Normalised Gram powers of a batch and the log of their certified bound.

    After j squarings, log_bound = sum_i log(c_i (1 + delta_i)) / 2^i, with
    c_i the Frobenius norm of the i-th computed square (before normalising)
    and delta_i its rounding allowance; lambda_max(H_0) <= exp(log_bound) *
    (1 + n u)^(1/2^j) (see the module docstring)."""

    def __init__(self, real, imag, log_bound, steps, n, u):
        self.real, self.imag, self.log_bound, self.steps = real, imag, log_bound, steps
        self.n, self.u = n, u

    def squared(self):
        n, u = self.n, self.u
        real, imag = _hermitian_square(self.real, self.imag)
        c = ops.maximum(_frobenius(real, imag), 1e-30)
        real, imag = real / c[:, None, None], imag / c[:, None, None]
        rayleigh = _rayleigh(real, imag, n, 1e-3)
        error = 12 * _gamma(n + 2, u) + 2 * u * c
        steps = self.steps + 1
        log_bound = self.log_bound + (ops.log(c) + ops.log1p(error / (c * rayleigh))) / 2 ** steps
        return _Powers(real, imag, log_bound, steps, n, u)

    def bound(self):
        """Upper bound on lambda_max(H_0), per matrix."""
        return ops.exp(self.log_bound + math.log1p(2 * self.n * self.u) / 2 ** self.steps)

    def take(self, indices):
        pick = lambda x: ops.take(x, indices, axis=0)  # noqa: E731
        return _Powers(pick(self.real), pick(self.imag), pick(self.log_bound), self.steps,
                       self.n, self.u)


def norm_upper_bound(kernel, geometry, u=None):
    """A certified upper bound on the norm of the circular operator `geometry`
    describes (for a zero-padded layer: the operator on its embedding size N,
    which bounds the layer), from matmuls with static shapes only.

    `kernel` is in the conv layout, as a tensor in the working dtype; the
    bound has that dtype. Differentiable (the gradient of the bound, not of
    the exact norm). Its ratio to the exact norm: BENCHMARKS.md.
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
    gram_real, gram_imag = _gram(real, imag)
    trace = ops.trace(gram_real, axis1=-2, axis2=-1)
    s0 = ops.maximum(_frobenius(gram_real, gram_imag), 1e-30)
    powers = _Powers(gram_real / s0[:, None, None], gram_imag / s0[:, None, None],
                     ops.zeros_like(s0), 0, n, u)
    for _ in range(_SCREEN_SQUARINGS):
        powers = powers.squared()
    if int(real.shape[0]) <= _REFINED:
        for _ in range(_REFINE_SQUARINGS):
            powers = powers.squared()
        lam = powers.bound() * s0
    else:
        # The refined matrices: the largest coarse bounds (times s0: the
        # bound on lambda_max(G) itself). The rest keep their coarse bound.
        values, indices = ops.top_k(powers.bound() * s0, _REFINED + 1)
        refined = powers.take(indices[:_REFINED])
        for _ in range(_REFINE_SQUARINGS):
            refined = refined.squared()
        lam = ops.concatenate([refined.bound() * ops.take(s0, indices[:_REFINED]),
                               values[_REFINED:]])
    # The Gram matrix's rounding, added for every matrix (largest trace).
    gram_error = 3 * _gamma(2 * inner, u) * trace
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
    frobenius = ops.sqrt(ops.sum(ops.square(kernel)))
    padded = bound + (u * math.sqrt(taps)) * frobenius
    return ops.where(bound <= max_norm, ops.ones_like(bound),
                     max_norm / ops.maximum(padded, 1e-30) * (1 - 4 * u))
