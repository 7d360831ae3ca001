"""NumPy references: the published method and explicit operator matrices.

Nothing here is fast. `published_*` reproduce the code released with Sedghi,
Gupta & Long, "The Singular Values of Convolutional Layers" (ICLR 2019), so
benchmarks compare against what people actually ran; the explicit operator
matrices (circular, zero-padded, or of any linear function applied to every
basis vector) are the independent oracles the tests check
`tfconvnorm.spectral` against. None of them uses the DFT or the embedding of
a padded convolution into a circular one.
"""

import numpy as np

from tfconvnorm.spectral.arguments import int_tuple

# The explicit matrix has (prod(input_shape) * c)^2 entries; refuse sizes that
# would silently eat the machine.
MAX_EXPLICIT_ENTRIES = 64_000_000
# Basis vectors `function_matrix` passes at once (bounds its memory).
_BASIS_CHUNK = 1024


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


def _tap_matrix(kernel, input_shape, out_shape, strides, dilation_rate, groups, position):
    """Dense matrix with entry (output p, channel o; input j, channel i) the sum
    of the kernel taps t (of o's group, channel i) for which `position(p, t)`
    is input j; taps that `position` puts outside the input read zero."""
    rank = len(input_shape)
    c_in_group, c_out = kernel.shape[-2:]
    c_in = c_in_group * groups
    c_out_group = c_out // groups
    rows = int(np.prod(out_shape, dtype=np.int64)) * c_out
    cols = int(np.prod(input_shape, dtype=np.int64)) * c_in
    if rows * cols > MAX_EXPLICIT_ENTRIES:
        raise ValueError(f"explicit operator matrix of {rows} x {cols} is too large")
    matrix = np.zeros((rows, cols))
    out_positions = np.stack(np.meshgrid(*[np.arange(m) for m in out_shape],
                                         indexing="ij"), -1).reshape(-1, rank)
    out_index = np.arange(out_positions.shape[0])
    for tap in np.ndindex(*kernel.shape[:rank]):
        in_positions = position(out_positions, np.array(tap))
        inside = np.all((in_positions >= 0) & (in_positions < np.array(input_shape)), axis=1)
        in_index = np.ravel_multi_index(tuple(in_positions[inside].T), input_shape)
        # Output channel o belongs to group o // c_out_group and reads that
        # group's input channels.
        o_global = np.arange(c_out)[None, None, :]
        i_global = (o_global // c_out_group) * c_in_group + np.arange(c_in_group)[None, :, None]
        row = out_index[inside][:, None, None] * c_out + o_global
        col = in_index[:, None, None] * c_in + i_global
        values = np.broadcast_to(kernel[tap][None], row.shape[:1] + kernel.shape[-2:])
        np.add.at(matrix, (np.broadcast_to(row, values.shape), np.broadcast_to(col, values.shape)),
                  values)
    return matrix


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
    input_shape = int_tuple(input_shape, rank, "input_shape")
    strides = int_tuple(strides, rank, "strides")
    dilation_rate = int_tuple(dilation_rate, rank, "dilation_rate")
    if len(input_shape) != rank:
        raise ValueError(f"input_shape={input_shape} does not match kernel rank {kernel.ndim}")
    c_in_group, c_out = kernel.shape[-2:]
    if rank == 0:
        if groups != 1:
            raise ValueError(f"a rank-2 kernel (a matrix) has groups=1, got groups={groups}")
        return kernel.T.copy()
    out_shape = tuple(n // s for n, s in zip(input_shape, strides))
    step, dilation, size = np.array(strides), np.array(dilation_rate), np.array(input_shape)
    return _tap_matrix(kernel, input_shape, out_shape, strides, dilation_rate, groups,
                       lambda p, t: (p * step + t * dilation) % size)


def tensorflow_pads(kernel_size, input_shape, strides=1, dilation_rate=1, padding="same"):
    """Per axis `(before, after)` zero pads and the output size, as TensorFlow
    and Keras pad: "same" (out = ceil(n / s), the odd pad after), "valid",
    "causal" ((k - 1) * d before), or explicit per-axis pairs."""
    rank = len(kernel_size)
    input_shape = int_tuple(input_shape, rank, "input_shape")
    strides = int_tuple(strides, rank, "strides")
    dilation_rate = int_tuple(dilation_rate, rank, "dilation_rate")
    pads, out = [], []
    for axis, (k, n, s, d) in enumerate(zip(kernel_size, input_shape, strides, dilation_rate)):
        extent = (k - 1) * d + 1
        if padding == "same":
            total = max((-(-n // s) - 1) * s + extent - n, 0)
            pad = (total // 2, total - total // 2)
        elif padding == "valid":
            pad = (0, 0)
        elif padding == "causal":
            pad = ((k - 1) * d, 0)
        else:
            pad = tuple(int(p) for p in padding[axis])
        pads.append(pad)
        out.append((n + pad[0] + pad[1] - extent) // s + 1)
    return tuple(pads), tuple(out)


def explicit_padded_operator_matrix(kernel, input_shape, strides=1, dilation_rate=1, groups=1,
                                    padding="same"):
    """Dense matrix of the zero-padded convolution a Keras / TF layer computes.

    Output position `p`, channel `o` reads input position
    `p * stride + t * dilation - pad_before` for every tap `t`, or zero where
    that falls outside the input (`tensorflow_pads` gives the pads). Layout
    as `explicit_operator_matrix`; a rank-2 kernel is the plain matrix.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    rank = kernel.ndim - 2
    if rank == 0:
        return explicit_operator_matrix(kernel, (), groups=groups)
    input_shape = int_tuple(input_shape, rank, "input_shape")
    strides = int_tuple(strides, rank, "strides")
    dilation_rate = int_tuple(dilation_rate, rank, "dilation_rate")
    pads, out_shape = tensorflow_pads(kernel.shape[:rank], input_shape, strides, dilation_rate,
                                      padding)
    step, dilation = np.array(strides), np.array(dilation_rate)
    before = np.array([p[0] for p in pads])
    return _tap_matrix(kernel, input_shape, out_shape, strides, dilation_rate, groups,
                       lambda p, t: p * step + t * dilation - before)


def function_matrix(function, input_shape):
    """Dense matrix of a linear `function` on arrays of `input_shape` (no batch
    axis), built by applying it to every basis vector at once: column j is
    `function(e_j)` flattened. `function` takes and returns NumPy arrays with
    a leading batch axis (e.g. `lambda x: keras_layer(x).numpy()`)."""
    size = int(np.prod(input_shape, dtype=np.int64))
    columns = []
    for start in range(0, size, _BASIS_CHUNK):  # a chunk of basis vectors at a time
        stop = min(start + _BASIS_CHUNK, size)
        basis = np.zeros((stop - start, size))
        basis[np.arange(stop - start), np.arange(start, stop)] = 1.0
        outputs = np.asarray(function(basis.reshape((-1,) + tuple(input_shape))), np.float64)
        columns.append(outputs.reshape(stop - start, -1))
        if columns[0].shape[1] * size > MAX_EXPLICIT_ENTRIES:
            raise ValueError(f"explicit matrix of {columns[0].shape[1]} x {size} is too large")
    return np.concatenate(columns).T


def explicit_singular_values(kernel, input_shape, strides=1, dilation_rate=1, groups=1):
    """All singular values of `explicit_operator_matrix`, sorted descending."""
    matrix = explicit_operator_matrix(kernel, input_shape, strides, dilation_rate, groups)
    return np.linalg.svd(matrix, compute_uv=False)


def grouped_singular_values(matrix, c_out, c_in, groups=1):
    """Singular values of an operator matrix block by block over channel groups.

    Rows index `(output position, output channel)` and columns `(input
    position, input channel)`, channels last (as every matrix here). Output
    channel o belongs to group `o // (c_out / groups)`, input channel i to
    `i // (c_in / groups)`; the operator is block diagonal over groups, and
    its singular values counted block by block are the multiset
    `tfconvnorm.conv_singular_values` returns (sorted descending).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    row_group = (np.arange(matrix.shape[0]) % c_out) // (c_out // groups)
    col_group = (np.arange(matrix.shape[1]) % c_in) // (c_in // groups)
    values = [np.linalg.svd(matrix[np.ix_(row_group == g, col_group == g)], compute_uv=False)
              for g in range(groups)]
    return np.sort(np.concatenate(values))[::-1]
