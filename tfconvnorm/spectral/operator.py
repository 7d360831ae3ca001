"""Validated convolution geometry and the per-axis DFT factors of its transform.

`Geometry` checks the arguments every public function takes (kernel shape,
input size, strides, dilation, groups, padding), resolves a zero padding
into the circular operator it is a submatrix of (`padding`), and holds the
small per-axis DFT matrices that map kernel taps to the per-frequency
matrices P(w) and back (`transforms`).
"""

import functools

import numpy as np
import tensorflow as tf

from tfconvnorm.spectral import padding as padding_lib
from tfconvnorm.spectral.arguments import check_positive_int, int_tuple

#: Largest (frequencies * phases * taps) for which the per-axis DFT factors
#: are combined into one matrix (`_combined_factors`, 2 * 8 bytes per entry
#: in float64); beyond it, one contraction per axis.
COMBINED_FACTOR_MAX_ENTRIES = 1 << 21


class Geometry:
    """Validated geometry of one convolution and its per-axis DFT factors.

    Everything below `input_shape` describes the circular operator that is
    decomposed: for `padding="circular"` the layer itself, otherwise the
    circular convolution on the embedding size N that the zero-padded layer
    is a submatrix of (`padding.circular_embedding`). `layer_input_shape`,
    `layer_output_shape`, `pads` and `count` describe the layer.
    """

    def __init__(self, kernel_shape, input_shape, strides, dilation_rate, groups,
                 padding=padding_lib.CIRCULAR):
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
        self.layer_input_shape = int_tuple(input_shape, rank, "input_shape")
        self.strides = int_tuple(strides, rank, "strides")
        self.dilation_rate = int_tuple(dilation_rate, rank, "dilation_rate")
        self.groups = check_positive_int(groups, "groups")
        # A matrix (Dense) has no boundary: every padding is the same operator.
        self.padding = (padding_lib.normalize_padding(padding, rank) if rank
                        else padding_lib.CIRCULAR)
        if self.padding == padding_lib.CIRCULAR:
            for n, s in zip(self.layer_input_shape, self.strides):
                if n % s:
                    raise ValueError(
                        f"strides={self.strides} do not divide input_shape="
                        f"{self.layer_input_shape}: the circular operator needs each stride "
                        f"to divide its input size ({s} does not divide {n}); for a "
                        "zero-padded layer pass its padding ('same', 'valid', ...)")
        embedding = padding_lib.circular_embedding(
            self.kernel_size, self.layer_input_shape, self.strides, self.dilation_rate,
            self.padding) if rank else padding_lib.CircularEmbedding((), (), ())
        #: The circular operator's input size (N for a padded layer).
        self.input_shape = embedding.input_shape
        self.layer_output_shape = embedding.output_shape
        self.pads = embedding.pads
        self.c_in_group, self.c_out = kernel_shape[-2:]
        if self.c_out % self.groups:
            raise ValueError(f"kernel has c_out={self.c_out} output channels, not divisible "
                             f"by groups={self.groups}")
        self.c_out_group = self.c_out // self.groups
        self.c_in = self.c_in_group * self.groups
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
        #: How many singular values the layer has (block by block over
        #: groups); the circular operator on N has at least as many, and its
        #: largest `count` bound the layer's entry by entry.
        self.count = self.groups * min(
            int(np.prod(self.layer_output_shape, dtype=np.int64)) * self.c_out_group,
            int(np.prod(self.layer_input_shape, dtype=np.int64)) * self.c_in_group)
        #: All axes' factors as one (frequencies, phases, taps) pair, or None
        #: where that would be too big (large 3-D inputs).
        self.combined = (
            _combined_factors(keys)
            if self.num_frequencies * self.phases * self.taps <= COMBINED_FACTOR_MAX_ENTRIES
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
    whole transform: one op instead of a few dozen, whose launches are most
    of the cost on small kernels (BENCHMARKS.md, the breakdown workload).
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


def tiny(dtype):
    return tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)


def prepare_kernel(kernel, name="kernel"):
    """Kernel as a float tensor, with a finiteness check that also runs in graphs."""
    kernel = tf.convert_to_tensor(kernel)
    if kernel.dtype.is_complex or kernel.dtype == tf.bool or kernel.dtype == tf.string:
        raise TypeError(f"{name} must be real floating point, got dtype {kernel.dtype.name}")
    if kernel.dtype.is_integer:
        kernel = tf.cast(kernel, tf.float32)
    kernel = tf.debugging.assert_all_finite(
        kernel, f"{name} has NaN or Inf entries; refusing to compute a spectrum of it")
    return kernel


def work_dtypes(dtype):
    """(real, complex) dtypes to compute in. Half types compute in float32."""
    if dtype == tf.float64:
        return tf.float64, tf.complex128
    return tf.float32, tf.complex64
