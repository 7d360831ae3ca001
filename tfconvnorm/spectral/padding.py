"""Zero-padded convolutions as submatrices of circular ones.

Real layers pad with zeros ('same', 'valid', 'causal', or explicit pads);
the DFT only diagonalises circular convolutions, and the circular operator
at the layer's own input size does *not* bound a padded layer (1-D kernel
[1, -1], n = 3, 'same': the layer's norm is 2 cos(pi/7) = 1.8019, the
circular one sqrt(3) = 1.7321).

What does hold: put the layer's n inputs at offset `pad_before` of a
length-N zero vector, convolve circularly, keep the layer's output
positions. When no position the layer reads as padding lands, modulo N, on
an input position, this is exactly the layer, so the layer's matrix is a
submatrix of the circular operator on N, and by Cauchy's interlacing
theorem sigma_i(layer) <= sigma_i(circular on N) for every i. Per axis, with
the layer reading padded positions [0, end):

    N >= n + pad_before     (the pads before the input do not wrap onto it)
    N >= end - pad_before   (nor do the positions read after it)
    N >= out * stride       (the layer's outputs are distinct circular outputs)
    N a multiple of the stride.

`circular_embedding` returns the smallest such N. The pads follow
TensorFlow's rule ('same': out = ceil(n / s), pad_total = max((out - 1) * s
+ (k - 1) * d + 1 - n, 0), pad_before = pad_total // 2; 'causal': (k - 1) * d
before, as Keras' Conv1D does), so they are the pads the layer applies.
"""

import typing

import numpy as np

from tfconvnorm.spectral.arguments import int_tuple

#: The published operator: wrap-around boundary, at the input size itself.
CIRCULAR = "circular"
#: Padding modes by name; explicit pads are given as per-axis (before, after).
PADDING_MODES = (CIRCULAR, "same", "valid", "causal")


class CircularEmbedding(typing.NamedTuple):
    """How a zero-padded convolution sits inside a circular one.

    Attributes:
      input_shape: N per spatial axis: the circular operator's input size.
      output_shape: the layer's own output size per axis.
      pads: per axis `(before, after)`, the zeros the layer pads its input
        with.
    """

    input_shape: tuple
    output_shape: tuple
    pads: tuple


def normalize_padding(padding, rank):
    """`padding` as a mode name or a tuple of `rank` (before, after) int pairs: the
    one check of a padding argument. rank=None (a constraint's config, whose
    rank only the kernel fixes): any number of pairs, 'causal' allowed."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES} or per-axis "
                             f"(before, after) pairs, got padding={padding!r}")
        if mode == "causal" and rank not in (1, None):
            raise ValueError(f"padding='causal' is for 1-D convolutions; this kernel has "
                             f"{rank} spatial axes")
        return mode
    try:
        items = tuple(padding)
    except TypeError:
        raise ValueError(f"padding must be one of {PADDING_MODES} or per-axis "
                         f"(before, after) pairs, got padding={padding!r}") from None
    try:
        pairs = tuple(tuple(pair) for pair in items)
    except TypeError:
        pairs = ()
    if (len(pairs) != rank if rank is not None else not pairs) or any(
            len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, (int, np.integer))
                                  or p < 0 for p in pair) for pair in pairs):
        count = rank if rank is not None else "per-axis"
        raise ValueError(f"explicit padding must give {count} (before, after) pairs of "
                         f"non-negative ints, one per spatial axis, got padding={padding!r}")
    return tuple((int(b), int(a)) for b, a in pairs)


def _axis_embedding(k, n, s, d, mode):
    """(N, out, before, after) of one axis; see the module docstring."""
    extent = (k - 1) * d + 1
    if mode == "same":
        out = -(-n // s)
        total = max((out - 1) * s + extent - n, 0)
        before, after = total // 2, total - total // 2
    elif mode == "valid":
        before = after = 0
    elif mode == "causal":
        before, after = (k - 1) * d, 0
    else:
        before, after = mode
    if mode != "same":
        padded = n + before + after
        out = (padded - extent) // s + 1 if padded >= extent else 0
    if out < 1:
        raise ValueError(
            f"the layer has no output: a kernel of extent {extent} (size {k}, dilation {d}) "
            f"does not fit into an input of size {n} with pads ({before}, {after})")
    end = (out - 1) * s + extent
    size = max(n + before, end - before, out * s)
    return -(-size // s) * s, out, before, after


def circular_embedding(kernel_size, input_shape, strides=1, dilation_rate=1, padding="same"):
    """The circular convolution that a zero-padded one is a submatrix of.

    Args:
      kernel_size: spatial kernel size, per axis.
      input_shape: the layer's spatial input size, per axis.
      strides, dilation_rate: per axis (an int: every axis).
      padding: "same", "valid", "causal" (1-D) or per-axis (before, after)
        pairs; "circular" returns the input size itself (the stride must
        divide it).

    Returns:
      A `CircularEmbedding`: the smallest circular input size N per axis
      that the layer embeds into (see the module docstring), the layer's
      output size and its pads.
    """
    kernel_size = tuple(int(k) for k in kernel_size)
    rank = len(kernel_size)

    input_shape = int_tuple(input_shape, rank, "input_shape")
    strides = int_tuple(strides, rank, "strides")
    dilation_rate = int_tuple(dilation_rate, rank, "dilation_rate")
    padding = normalize_padding(padding, rank)
    if padding == CIRCULAR:
        if any(n % s for n, s in zip(input_shape, strides)):
            raise ValueError(f"strides={strides} do not divide input_shape={input_shape}: "
                             "the circular operator needs each stride to divide its input "
                             "size")
        return CircularEmbedding(input_shape, tuple(n // s for n, s in zip(input_shape, strides)),
                                 ((0, 0),) * rank)
    modes = (padding,) * rank if isinstance(padding, str) else padding
    axes = [_axis_embedding(k, n, s, d, mode) for k, n, s, d, mode in
            zip(kernel_size, input_shape, strides, dilation_rate, modes)]
    return CircularEmbedding(tuple(a[0] for a in axes), tuple(a[1] for a in axes),
                             tuple((a[2], a[3]) for a in axes))
