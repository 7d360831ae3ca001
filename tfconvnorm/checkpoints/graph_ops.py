"""Attributes of TF graph ops, shared by the readers that take geometry from a graph
(`tf1_meta`, `savedmodel`)."""


def conv_op_attributes(op, rank):
    """(channels_first, spatial axes, strides, dilations, padding) of a TF conv op:
    padding the mode's name, or per-axis (before, after) pairs for EXPLICIT."""
    data_format = op.get_attr("data_format")
    data_format = data_format.decode() if isinstance(data_format, bytes) else data_format
    channels_first = data_format.startswith("NC")
    axes = tuple(range(2, rank + 2)) if channels_first else tuple(range(1, rank + 1))
    strides = tuple(int(op.get_attr("strides")[a]) for a in axes)
    dilations = tuple(int(op.get_attr("dilations")[a]) for a in axes)
    padding = op.get_attr("padding")
    padding = (padding.decode() if isinstance(padding, bytes) else padding).lower()
    if padding == "explicit":
        pads = list(op.get_attr("explicit_paddings"))
        padding = tuple((int(pads[2 * a]), int(pads[2 * a + 1])) for a in axes)
    return channels_first, axes, strides, dilations, padding
