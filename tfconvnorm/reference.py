"""NumPy references: the published method and the explicit operator matrix.

Nothing here is fast. `published_*` reproduce the code released with Sedghi,
Gupta & Long, "The Singular Values of Convolutional Layers" (ICLR 2019), so
benchmarks compare against what people actually ran; the explicit operator
matrix is the independent oracle the tests check `tfconvnorm.spectral` against.
"""

import numpy as np

# The explicit matrix has (prod(input_shape) * c)^2 entries; refuse sizes that
# would silently eat the machine.
MAX_EXPLICIT_ENTRIES = 64_000_000


def published_singular_values(kernel, input_shape):
    """The published method, verbatim: `fft2` + batched SVD (2-D, stride 1).

    Returns the per-frequency singular values, shape
    `(n, n, min(c_in, c_out))`, exactly as the released code does. Note its
    limits, which `tfconvnorm.conv_singular_values` does not share: strides
    and dilation are ignored, and an input smaller than the kernel is silently
    cropped by `fft2` instead of wrapped.
    """
    transforms = np.fft.fft2(kernel, input_shape, axes=[0, 1])
    return np.linalg.svd(transforms, compute_uv=False)


def published_clip(kernel, input_shape, max_norm):
    """The published projection: clip every per-frequency singular value at
    `max_norm`, inverse FFT, truncate to the kernel's support (once).

    The truncation can raise the norm again; the result is not guaranteed to
    satisfy the bound.
    """
    kernel = np.asarray(kernel)
    transforms = np.fft.fft2(kernel, input_shape, axes=[0, 1])
    u, s, vh = np.linalg.svd(transforms, full_matrices=False)
    s_clipped = np.minimum(s, max_norm)
    clipped = np.matmul(u, s_clipped[..., None] * vh)
    clipped_kernel = np.fft.ifft2(clipped, axes=[0, 1]).real
    return clipped_kernel[np.ix_(*[range(d) for d in kernel.shape[:2]])]


def _as_tuple(value, rank):
    if np.ndim(value) == 0:
        return (int(value),) * rank
    return tuple(int(v) for v in value)


def explicit_operator_matrix(kernel, input_shape, strides=1, dilation_rate=1,
                             groups=1):
    """Dense matrix of the circular (wrap-around) convolution, built tap by tap.

    Keras' convention (cross-correlation): output position `p`, channel `o`
    reads input position `(p * stride + t * dilation) mod n` for every tap
    `t`. Rows index `(output position, output channel)`, columns
    `(input position, input channel)`, both C-order. A rank-2 kernel with
    `input_shape=()` is a plain matrix `y = x @ kernel` (a Dense layer).
    Built directly from indices, without FFTs or TF, so that it is an oracle
    independent of `tfconvnorm.spectral`.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    rank = kernel.ndim - 2
    input_shape = _as_tuple(input_shape, rank)
    strides = _as_tuple(strides, rank)
    dilation_rate = _as_tuple(dilation_rate, rank)
    if len(input_shape) != rank:
        raise ValueError(f"input_shape={input_shape} does not match kernel rank {kernel.ndim}")
    c_in_group, c_out = kernel.shape[-2:]
    if rank == 0:
        if groups != 1:
            raise ValueError(f"a rank-2 kernel (a matrix) has groups=1, got groups={groups}")
        return kernel.T.copy()
    c_in = c_in_group * groups
    c_out_group = c_out // groups
    out_shape = tuple(n // s for n, s in zip(input_shape, strides))
    rows = int(np.prod(out_shape, dtype=np.int64)) * c_out
    cols = int(np.prod(input_shape, dtype=np.int64)) * c_in
    if rows * cols > MAX_EXPLICIT_ENTRIES:
        raise ValueError(f"explicit operator matrix of {rows} x {cols} is too large")
    matrix = np.zeros((rows, cols))
    out_positions = np.stack(np.meshgrid(*[np.arange(m) for m in out_shape],
                                         indexing="ij"), -1).reshape(-1, rank)
    out_index = np.arange(out_positions.shape[0])
    for tap in np.ndindex(*kernel.shape[:rank]):
        in_positions = (out_positions * np.array(strides, dtype=np.int64)
                        + np.array(tap) * np.array(dilation_rate)) % np.array(input_shape)
        in_index = (np.ravel_multi_index(tuple(in_positions.T), input_shape)
                    if rank else np.zeros(1, dtype=np.int64))
        # Output channel o belongs to group o // c_out_group and reads that
        # group's input channels.
        o_global = np.arange(c_out)[None, None, :]
        i_global = (o_global // c_out_group) * c_in_group + np.arange(c_in_group)[None, :, None]
        row = out_index[:, None, None] * c_out + o_global
        col = in_index[:, None, None] * c_in + i_global
        values = np.broadcast_to(kernel[tap][None], row.shape[:1] + kernel.shape[-2:])
        np.add.at(matrix, (np.broadcast_to(row, values.shape), np.broadcast_to(col, values.shape)),
                  values)
    return matrix


def explicit_singular_values(kernel, input_shape, strides=1, dilation_rate=1, groups=1):
    """All singular values of `explicit_operator_matrix`, sorted descending."""
    matrix = explicit_operator_matrix(kernel, input_shape, strides, dilation_rate, groups)
    return np.linalg.svd(matrix, compute_uv=False)
