"""TF1 name-based checkpoints with their `.meta` graph: geometry from the conv ops."""

import collections
import os
import re
import warnings

import tensorflow as tf

from tfconvnorm import geometry as geometry_lib
from tfconvnorm.checkpoints.graph_ops import conv_op_attributes
from tfconvnorm.checkpoints.records import (Checkpoint, CheckpointError, LayerRecord,
                                            first_line)
from tfconvnorm.checkpoints.tf_checkpoint import (checkpoint_shapes, get_tensor, require_exists,
                                                  resolve_checkpoint_prefix)

FORMAT = "tf1_meta"


# Ops through which a conv's filter input is followed up to its variable.
_PASS_THROUGH_OPS = ("Identity", "ReadVariableOp", "Cast", "Enter", "StopGradient")
_VARIABLE_OPS = ("VariableV2", "Variable", "VarHandleOp")
_TF1_CONV_OPS = ("Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput")
# TF1 training graphs hold a Conv2DBackpropInput per conv in their gradients.
_GRADIENT_SCOPE = re.compile(r"(^|/)gradients(_\d+)?/")
_MAX_WALK = 16


def detect(path):
    """A TF checkpoint with its `.meta` graph next to it."""
    return os.path.exists(resolve_checkpoint_prefix(path) + ".meta")


def read(path, family=None, depth=None, image_size=None):  # pylint: disable=unused-argument
    """The `Checkpoint` of a TF1 checkpoint: geometry from its `.meta` graph."""
    return Checkpoint(path, FORMAT, read_tf1_meta_checkpoint(path, image_size=image_size),
                      "graph from the .meta file", None, "a TF1 graph, not a Keras model")


def _variable_op(tensor):
    """The variable op a conv's filter input reads, or None (a computed filter)."""
    op = tensor.op
    for _ in range(_MAX_WALK):
        if op.type in _VARIABLE_OPS:
            return op
        if op.type not in _PASS_THROUGH_OPS or not op.inputs:
            return None
        op = op.inputs[0].op
    return None


def _variable_name(op, shapes):
    """The checkpoint name of a variable op (Saver's default: the op name)."""
    candidates = [op.name]
    if op.type == "VarHandleOp":
        shared = op.get_attr("shared_name")
        shared = shared.decode() if isinstance(shared, bytes) else shared
        if shared:
            candidates.append(shared)
    for name in candidates:
        if name in shapes:
            return name
    return candidates[0]


def _load_meta_graph_def(meta_path):
    meta_graph_def = tf.compat.v1.MetaGraphDef()
    try:
        with open(meta_path, "rb") as f:
            meta_graph_def.ParseFromString(f.read())
    except Exception as error:  # pylint: disable=broad-except
        raise CheckpointError(f"{meta_path}: unreadable or truncated .meta graph: "
                              f"{first_line(error)}") from error
    return meta_graph_def


def _spatial_placeholder_map(graph_def, image_size):
    """Placeholders of rank-4 images with two unknown dims, fixed to `image_size`."""
    sized = {}
    for node in graph_def.node:
        if node.op != "Placeholder" or "shape" not in node.attr:
            continue
        shape = node.attr["shape"].shape
        if shape.unknown_rank or len(shape.dim) != 4:
            continue
        dims = [d.size for d in shape.dim]
        unknown = [i for i in (1, 2, 3) if dims[i] < 0]
        if len(unknown) == 2 and unknown in ([1, 2], [2, 3]):
            for i in unknown:
                dims[i] = image_size
            sized[node.name] = (tf.as_dtype(node.attr["dtype"].type),
                                [None if d < 0 else d for d in dims])
    return sized


def _import_graph(graph_def, meta_path, image_size=None):
    graph = tf.Graph()
    with graph.as_default():
        input_map = {}
        if image_size is not None:
            for name, (dtype, shape) in _spatial_placeholder_map(graph_def, image_size).items():
                input_map[name + ":0"] = tf.compat.v1.placeholder(
                    dtype, shape, name=f"tfconvnorm_sized/{name}")
        try:
            tf.compat.v1.import_graph_def(graph_def, input_map=input_map or None, name="")
        except (ValueError, tf.errors.OpError) as error:
            raise CheckpointError(f"{meta_path}: cannot import the graph: "
                                  f"{first_line(error)}") from error
    return graph


def _data_shape(op):
    """Shape of the feature map the conv (or transposed conv: its output) acts on."""
    return op.outputs[0].shape if op.type == "Conv2DBackpropInput" else op.inputs[0].shape


def _static_input_size(op):
    shape = _data_shape(op)
    return shape.rank == 4 and None not in shape.as_list()[1:]


def _tf1_geometry(op, image_size_hint, meta_path):
    """`ConvGeometry` and kernel shape of one TF1 conv op."""
    channels_first, spatial_axes, strides, dilations, padding = conv_op_attributes(op, 2)
    filter_shape = tuple(op.inputs[1].shape.as_list())
    data_shape = _data_shape(op)
    # A transposed conv is the adjoint of the strided conv of its output size:
    # same spectrum.
    kind = (geometry_lib.KIND_CONV_TRANSPOSE if op.type == "Conv2DBackpropInput"
            else geometry_lib.KIND_CONV)
    dims = data_shape.as_list() if data_shape.rank == 4 else [None] * 4
    size = tuple(dims[a] for a in spatial_axes)
    channels = dims[1] if channels_first else dims[3]
    if any(d is None for d in size) or any(d is None for d in filter_shape):
        hint = ("" if image_size_hint is None else
                f" even with image_size={image_size_hint} for the input placeholders")
        raise CheckpointError(
            f"{meta_path}: the input size of op {op.name!r} ({op.type}) is not static in "
            f"the graph ({data_shape}){hint}; pass the image size the network was "
            "built for (--image_size)")
    if op.type == "DepthwiseConv2dNative":
        kh, kw, c_in, multiplier = filter_shape
        kernel_shape, groups = (kh, kw, 1, c_in * multiplier), c_in
        kind = geometry_lib.KIND_DEPTHWISE
    elif op.type == "Conv2D":
        kernel_shape = filter_shape
        groups = channels // filter_shape[2] if channels else 1
    else:
        kernel_shape, groups = filter_shape, 1
    # The op's own zero padding: the spectrum is that of the circular
    # convolution it embeds into, a certified bound; no rounding needed.
    return geometry_lib.ConvGeometry(
        kernel_shape=tuple(kernel_shape), input_shape=tuple(size), strides=strides,
        dilation_rate=dilations, groups=int(groups), kind=kind, padding=padding)


def read_tf1_meta_checkpoint(path, image_size=None):
    """Reads a TF1 name-based checkpoint and its `.meta` graph.

    Every `Conv2D` / `DepthwiseConv2dNative` op (and `Conv2DBackpropInput`
    outside gradient scopes: a transposed conv) gives one record: input
    shape, strides, dilations, padding (SAME, VALID, EXPLICIT) and data
    format (NHWC or NCHW) from the op, the kernel from the variable its
    filter reads. Nothing of the graph runs; the values come from
    `tf.train.load_checkpoint`. Convs whose filter is computed rather than
    read from a variable are skipped with a warning. Dilated convs that TF1
    built with space-to-batch appear as undilated convs on the smaller grids:
    the dilated conv is a submatrix of that op (space-to-batch pads and
    permutes, batch-to-space crops), so the op's bounds hold for it.

    Args:
      path: checkpoint prefix, one of its files (`.meta`, `.index`), or a
        directory (its latest checkpoint).
      image_size: used only where the graph leaves the input size open:
        rank-4 placeholders with unknown spatial size are fixed to it.

    Returns:
      A list of `LayerRecord` named by the kernel variables, in graph order.
      A variable used by several convs of different geometry gets one record
      per conv, named `variable@op`.

    Raises:
      FileNotFoundError: nothing at `path`.
      CheckpointError: unreadable files, no conv ops, a static input size
        missing, or a kernel variable absent from the checkpoint or of another
        shape (named).
    """
    path = os.fspath(path)
    prefix = resolve_checkpoint_prefix(path)
    meta_path = prefix + ".meta"
    require_exists(path, meta_path)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path}: no .meta graph ({meta_path!r} is missing)")
    reader, shapes = checkpoint_shapes(prefix, path)
    graph_def = _load_meta_graph_def(meta_path).graph_def
    graph = _import_graph(graph_def, meta_path)
    conv_ops = [op for op in graph.get_operations() if op.type in _TF1_CONV_OPS
                and not (op.type == "Conv2DBackpropInput" and _GRADIENT_SCOPE.search(op.name))]
    if image_size is not None and not all(map(_static_input_size, conv_ops)):
        graph = _import_graph(graph_def, meta_path, image_size)
        conv_ops = [graph.get_operation_by_name(op.name) for op in conv_ops]
    if not conv_ops:
        raise CheckpointError(f"{meta_path}: the graph has no {'/'.join(_TF1_CONV_OPS)} ops")

    entries, skipped = [], []
    for op in conv_ops:
        variable = _variable_op(op.inputs[1])
        if variable is None:
            skipped.append(op.name)
            continue
        name = _variable_name(variable, shapes)
        geometry = _tf1_geometry(op, image_size, meta_path)
        if name not in shapes:
            raise CheckpointError(f"{path}: kernel variable {name!r} of op {op.name!r} is "
                                  "missing from the checkpoint")
        stored = tuple(shapes[name])
        if stored != tuple(op.inputs[1].shape.as_list()):
            raise CheckpointError(
                f"{path}: kernel variable {name!r} of op {op.name!r} has shape {stored} in "
                f"the checkpoint, the graph expects {tuple(op.inputs[1].shape.as_list())}")
        entries.append((name, op.name, geometry))
    if skipped:
        warnings.warn(f"{meta_path}: skipped {len(skipped)} conv ops whose filter is not "
                      f"read from a variable: {skipped[:5]}")
    if not entries:
        raise CheckpointError(f"{meta_path}: no conv op reads its kernel from a variable")

    # One record per (variable, geometry): towers / replicas share kernels.
    unique, by_variable = [], collections.defaultdict(list)
    for name, op_name, geometry in entries:
        if geometry in by_variable[name]:
            continue
        by_variable[name].append(geometry)
        unique.append((name, op_name, geometry))
    records = []
    for name, op_name, geometry in unique:
        value = get_tensor(reader, name, path)
        kernel = value.reshape(geometry.kernel_shape)  # depthwise (k, k, c, m) -> (k, k, 1, c*m)
        label = name if len(by_variable[name]) == 1 else f"{name}@{op_name}"
        records.append(LayerRecord(label, kernel, geometry))
    return records
