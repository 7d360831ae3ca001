"""TF2 SavedModels (`tf.saved_model.save`, Keras' `model.export()`, TF Hub / Kaggle Models).

Read as data, never loaded as a live object: files written by older TF or
Keras versions (optimizer slots, custom objects) often fail
`tf.saved_model.load`, and nothing from the file should run. `saved_model.pb`
holds the function library (every traced function as a graph), the object
graph (which function captured which variables) and the signatures; the
values are in the `variables/variables` checkpoint, whose object graph has the
same node numbering.

Every Conv2D / Conv3D / DepthwiseConv2dNative / Conv2DBackpropInput /
MatMul whose kernel is a captured variable gives one record: its input shape
from the function's graph (shapes are inferred, nothing is executed), its
strides, dilations, padding (SAME, VALID, EXPLICIT) and data format from the
op. A variable reaches a function either as a captured input of a concrete
function (the object graph's `bound_inputs`) or as an argument of a call from
one (followed through PartitionedCall / StatefulPartitionedCall). Each kernel
is reported once, however many traced functions use it.
"""

import os

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tfconvnorm import _compat
from tfconvnorm import geometry as geometry_lib
from tfconvnorm.checkpoints.graph_ops import conv_op_attributes
from tfconvnorm.checkpoints.records import (Checkpoint, CheckpointError, LayerRecord,
                                            first_line)
from tfconvnorm.checkpoints.tf_checkpoint import TF2_GRAPH_KEY, get_tensor, require_exists

FORMAT = "savedmodel"

SAVED_MODEL_FILENAME = "saved_model.pb"
_CONV_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput")
_MATMUL_OPS = ("MatMul", "BatchMatMulV2", "BatchMatMul")
# Ops through which a kernel is followed up to the function argument it reads.
_PASS_THROUGH = ("Identity", "ReadVariableOp", "Cast", "ExpandDims", "Reshape")
_CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
_MAX_WALK = 16


def savedmodel_directory(path):
    """The SavedModel directory of `path` (the directory or its saved_model.pb), or None."""
    path = os.fspath(path)
    if os.path.basename(path) == SAVED_MODEL_FILENAME and os.path.isfile(path):
        return os.path.dirname(path) or "."
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, SAVED_MODEL_FILENAME)):
        return path
    return None


def detect(path):
    """A directory holding `saved_model.pb`, or that file."""
    return savedmodel_directory(path) is not None


def read(path, family=None, depth=None, image_size=None):  # pylint: disable=unused-argument
    """The `Checkpoint` of a SavedModel: geometry from its serving functions' graphs."""
    return Checkpoint(path, FORMAT, read_savedmodel(path, image_size=image_size),
                      "functions of the SavedModel", None,
                      "a SavedModel is read as graphs, not loaded as a Keras model")


def _load(directory, path):
    saved = saved_model_pb2.SavedModel()
    try:
        with open(os.path.join(directory, SAVED_MODEL_FILENAME), "rb") as f:
            saved.ParseFromString(f.read())
    except Exception as error:  # pylint: disable=broad-except
        raise CheckpointError(f"{path}: unreadable {SAVED_MODEL_FILENAME}: "
                              f"{first_line(error)}") from error
    graphs = [g for g in saved.meta_graphs if "serve" in g.meta_info_def.tags] or \
        list(saved.meta_graphs)
    if not graphs:
        raise CheckpointError(f"{path}: {SAVED_MODEL_FILENAME} holds no meta graph")
    return graphs[0]


def _checkpoint_keys(directory, path):
    """(reader, {object graph node id: checkpoint key of its value})."""
    prefix = os.path.join(directory, "variables", "variables")
    try:
        reader = tf.train.load_checkpoint(prefix)
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor(TF2_GRAPH_KEY))
    except Exception as error:  # pylint: disable=broad-except
        raise CheckpointError(f"{path}: unreadable variables checkpoint {prefix!r}: "
                              f"{first_line(error)}") from error
    keys = {}
    for index, node in enumerate(graph.nodes):
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                keys[index] = attribute.checkpoint_key
    return reader, keys


def _function_inputs(meta_graph):
    """{(function name, argument index): variable node id}, from the concrete
    functions' captures and propagated through call ops to a fixpoint."""
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    known = {}
    for name, concrete in meta_graph.object_graph_def.concrete_functions.items():
        function = library.get(name)
        if function is None:
            continue
        first = len(function.signature.input_arg) - len(concrete.bound_inputs)
        for j, node_id in enumerate(concrete.bound_inputs):
            known[(name, first + j)] = node_id
    changed = True
    while changed:
        changed = False
        for name, function in library.items():
            args = {a.name: i for i, a in enumerate(function.signature.input_arg)}
            for node in function.node_def:
                callee = (node.attr["f"].func.name if node.op in _CALL_OPS
                          else node.op if node.op in library else None)
                if callee is None:
                    continue
                data_inputs = [i for i in node.input if not i.startswith("^")]
                for position, source in enumerate(data_inputs):
                    arg = args.get(source.split(":")[0])
                    if arg is not None and (name, arg) in known \
                            and (callee, position) not in known:
                        known[(callee, position)] = known[(name, arg)]
                        changed = True
    return library, known


def _argument_of(tensor):
    """The function argument (a Placeholder) a kernel tensor is read from, or None."""
    op = tensor.op
    for _ in range(_MAX_WALK):
        if op.type == "Placeholder":
            return op.name
        if op.type not in _PASS_THROUGH or not op.inputs:
            return None
        op = op.inputs[0].op
    return None


def _spatial(shape, channels_first, rank):
    dims = shape.as_list() if shape.rank is not None else None
    if dims is None or len(dims) != rank + 2:
        return None
    return tuple(dims[2:] if channels_first else dims[1:-1])


def _geometry(op, kernel_shape):
    """(ConvGeometry, conv-layout kernel shape) of one op; None if not static."""
    if op.type in _MATMUL_OPS:
        transpose = op.get_attr("transpose_b") if "transpose_b" in op.node_def.attr else \
            op.get_attr("adj_y")
        shape = tuple(reversed(kernel_shape)) if transpose else tuple(kernel_shape)
        return geometry_lib.ConvGeometry(shape, (), (), (), 1, geometry_lib.KIND_DENSE,
                                         geometry_lib.DENSE_PADDING), transpose
    rank = len(kernel_shape) - 2
    channels_first, _, strides, dilations, padding = conv_op_attributes(op, rank)
    transposed = op.type == "Conv2DBackpropInput"
    data = op.outputs[0] if transposed else op.inputs[0]
    size = _spatial(data.shape, channels_first, rank)
    if size is None or None in size:
        return None
    channels = data.shape[1 if channels_first else -1]
    if op.type == "DepthwiseConv2dNative":
        *k, c_in, multiplier = kernel_shape
        return geometry_lib.ConvGeometry(tuple(k) + (1, c_in * multiplier), size, strides,
                                         dilations, c_in, geometry_lib.KIND_DEPTHWISE,
                                         padding), False
    kind = geometry_lib.KIND_CONV_TRANSPOSE if transposed else geometry_lib.KIND_CONV
    groups = 1 if transposed or channels is None else int(channels) // int(kernel_shape[-2])
    return geometry_lib.ConvGeometry(tuple(kernel_shape), size, strides, dilations, groups,
                                     kind, padding), False


def _input_shapes(function, image_size):
    """Argument shapes with unknown spatial sizes set to `image_size` (None: as saved)."""
    if image_size is None:
        return None
    shapes = []
    for index, arg in enumerate(function.signature.input_arg):
        attr = function.arg_attr[index].attr if index in function.arg_attr else {}
        if "_output_shapes" not in attr or not attr["_output_shapes"].list.shape:
            shapes.append(None)
            continue
        dims = [d.size for d in attr["_output_shapes"].list.shape[0].dim]
        if len(dims) >= 3 and arg.type == tf.float32.as_datatype_enum:
            dims = [dims[0]] + [image_size if d < 0 else d for d in dims[1:]]
        shapes.append(tf.TensorShape([None if d < 0 else d for d in dims]))
    return shapes


def _copy(function):
    copied = type(function)()
    copied.CopyFrom(function)
    return copied


def read_savedmodel(path, image_size=None):
    """Reads the kernels of a TF2 SavedModel with their geometry (see the module).

    Args:
      path: the SavedModel directory, or its saved_model.pb.
      image_size: the spatial size for inputs the functions leave open (an int).

    Returns:
      A list of `LayerRecord`, one per kernel variable, named by the
      variable's name in the object graph.

    Raises:
      FileNotFoundError: nothing at `path`.
      CheckpointError: unreadable files, no conv or matmul reading a variable,
        or a conv whose input size is not static (pass `image_size`).
    """
    path = os.fspath(path)
    require_exists(path)
    directory = savedmodel_directory(path)
    if directory is None:
        raise CheckpointError(f"{path}: not a SavedModel (no {SAVED_MODEL_FILENAME})")
    meta_graph = _load(directory, path)
    reader, keys = _checkpoint_keys(directory, path)
    nodes = meta_graph.object_graph_def.nodes
    library, known = _function_inputs(meta_graph)
    found, open_sizes = {}, []
    for name, function in library.items():
        if not any(n.op in _CONV_OPS + _MATMUL_OPS for n in function.node_def):
            continue
        args = {a.name: i for i, a in enumerate(function.signature.input_arg)}
        if not any((name, i) in known for i in args.values()):
            continue
        shapes = _input_shapes(function, image_size)
        if shapes is not None:
            # A saved argument shape would override the one given: drop it.
            function = _copy(function)
            for index, shape in enumerate(shapes):
                if shape is not None and index in function.arg_attr:
                    del function.arg_attr[index].attr["_output_shapes"]
        try:
            graph = _compat.function_def_to_graph(function, input_shapes=shapes)
        except Exception as error:  # pylint: disable=broad-except
            raise CheckpointError(f"{path}: cannot rebuild the graph of function {name!r}: "
                                  f"{first_line(error)}") from error
        for op in graph.get_operations():
            if op.type not in _CONV_OPS + _MATMUL_OPS:
                continue
            kernel = op.inputs[1]
            node_id = known.get((name, args.get(_argument_of(kernel), -1)))
            if node_id is None or node_id in found:
                continue
            described = _geometry(op, tuple(kernel.shape.as_list()))
            if described is None:
                open_sizes.append(op.name)
                continue
            found[node_id] = (op, kernel, described)
    if not found:
        if open_sizes:
            raise CheckpointError(f"{path}: the input sizes of {open_sizes[:3]} are not static "
                                  "in the saved functions; pass the image size (--image_size)")
        raise CheckpointError(f"{path}: no conv or matmul op reads a saved variable")
    records = []
    for node_id, (op, kernel, (geometry, transpose)) in sorted(found.items()):
        if node_id not in keys:
            raise CheckpointError(f"{path}: variable node {node_id} of op {op.name!r} has no "
                                  "value in variables/variables")
        value = get_tensor(reader, keys[node_id], path)
        if transpose:
            value = value.T
        value = np.reshape(value, geometry.kernel_shape if geometry.kind != "depthwise" else
                           tuple(kernel.shape.as_list()))
        value = np.asarray(geometry_lib.to_conv_layout(value, geometry.kind))
        name = nodes[node_id].variable.name or f"variable_{node_id}"
        records.append(LayerRecord(name, value, geometry))
    return records
