"""Kernels of trained and pretrained networks, each with its geometry, and their spectra.

Readers turn the checkpoints people have into `LayerRecord`s (name, kernel in
the spectral core's layout, `ConvGeometry`); `layer_spectra` runs the spectral
core on them; the writers store the result (`spectra.npz`, `summary.csv`).

    format          reader                       geometry from
    keras           read_keras_model_file        the model in the file
    tf2             read_tf2_checkpoint          a Keras model built by the caller
    tf1_meta        read_tf1_meta_checkpoint     the Conv2D ops of the `.meta` graph
    slim            read_slim_resnet_v2          a Keras model + a name map
    keras_weights   read_keras_weights_file      a Keras model built by the caller

The readers never import `models/`: architectures come from the caller (see
`analyze.py`). Values are read directly from the files and compared, variable
by variable, with the architecture, so that a mismatch is reported by name
instead of surfacing deep inside TF or silently loading a subset.

Every layer is described with its own zero padding, so the spectra are
certified entrywise upper bounds on the layer's singular values (the circular
convolution on the embedding size N that contains the layer), for any stride
and input size; `layer_spectra` adds a certified interval for each layer's
norm (`tfconvnorm.conv_operator_norm_bounds_many`). Only geometries built
with `boundary="circular"` (the published operator) can be `approximate`: a
stride that does not divide the input size is then rounded up.
"""

import collections
import csv
import dataclasses
import io
import math
import os
import re
import tempfile
import typing
import warnings
import zipfile

import keras
import numpy as np
import tensorflow as tf

from tfconvnorm import geometry as geometry_lib
from tfconvnorm import spectral

FORMAT_KERAS = "keras"
FORMAT_TF2 = "tf2"
FORMAT_TF1_META = "tf1_meta"
FORMAT_SLIM = "slim"
FORMAT_KERAS_WEIGHTS = "keras_weights"
FORMATS = (FORMAT_KERAS, FORMAT_TF2, FORMAT_TF1_META, FORMAT_SLIM, FORMAT_KERAS_WEIGHTS)
DTYPES = ("float32", "float64")

SPECTRA_FILENAME = "spectra.npz"
SUMMARY_FILENAME = "summary.csv"
LIPSCHITZ_ROW_NAME = "LIPSCHITZ_UPPER_BOUND"
LIPSCHITZ_NOTE = "certified l2 Lipschitz upper bound of the whole model in inference"
APPROXIMATE_NOTE = ("approximate: the stride does not divide the input size; computed "
                    "at the next size it divides")
BOUND_NOTE = ("spectrum: upper bounds on the layer's singular values, entry by entry "
              "(circular convolution on the embedding size)")
CIRCULAR_NOTE = "spectrum: the circular operator's (not a bound on a zero-padded layer)"

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TF2_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"
_TF2_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_TF2_SLOT_MARKER = "/.OPTIMIZER_SLOT/"
_SLIM_SCOPE = re.compile(r"^(resnet_v2_\d+)/")
# Ops through which a conv's filter input is followed up to its variable.
_PASS_THROUGH_OPS = ("Identity", "ReadVariableOp", "Cast", "Enter", "StopGradient")
_VARIABLE_OPS = ("VariableV2", "Variable", "VarHandleOp")
_TF1_CONV_OPS = ("Conv2D", "DepthwiseConv2dNative", "Conv2DBackpropInput")
# TF1 training graphs hold a Conv2DBackpropInput per conv in their gradients.
_GRADIENT_SCOPE = re.compile(r"(^|/)gradients(_\d+)?/")
_MAX_WALK = 16


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the architecture given.

    The message names the file and, for a mismatch, the first variable that
    does not match.
    """


class LayerRecord(typing.NamedTuple):
    """One kernel to analyse.

    Attributes:
      name: the kernel's name in the checkpoint (Keras variable path, TF1 / slim
        variable name).
      kernel: NumPy array in the spectral core's layout.
      geometry: `tfconvnorm.geometry.ConvGeometry`.
    """

    name: str
    kernel: np.ndarray
    geometry: geometry_lib.ConvGeometry


# ---------------------------------------------------------------------------
# Paths and formats.


def _require_exists(path, *candidates):
    """Raises FileNotFoundError naming `path` unless it or a candidate exists."""
    if not any(os.path.exists(p) for p in (path,) + candidates):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")


def _magic(path, size=8):
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _strip_checkpoint_suffix(path):
    """`ckpt.index`, `ckpt.meta`, `ckpt.data-00000-of-00001` -> `ckpt`."""
    for pattern in (r"\.index$", r"\.meta$", r"\.data-\d+-of-\d+$"):
        stripped = re.sub(pattern, "", path)
        if stripped != path:
            return stripped
    return path


def resolve_checkpoint_prefix(path):
    """The checkpoint prefix for a prefix, one of its files, or a directory.

    Directories resolve to their latest checkpoint (their `checkpoint` state
    file), looking into a `checkpoints/` subdirectory as `train.py` writes it.

    Raises:
      FileNotFoundError: nothing at `path`.
      CheckpointError: a directory without checkpoints, or a prefix with no
        `.index` file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for directory in (path, os.path.join(path, "checkpoints")):
            if os.path.isdir(directory):
                latest = tf.train.latest_checkpoint(directory)
                if latest:
                    return latest
        raise CheckpointError(f"{path}: directory holds no TF checkpoint (no 'checkpoint' "
                              "state file here or in checkpoints/); pass a checkpoint prefix")
    prefix = _strip_checkpoint_suffix(path)
    _require_exists(path, prefix + ".index")
    if not os.path.exists(prefix + ".index"):
        raise CheckpointError(f"{path}: not a TF checkpoint: {prefix + '.index'!r} is missing")
    return prefix


def _open_checkpoint(prefix, path=None):
    try:
        return tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as error:
        raise CheckpointError(f"{path or prefix}: unreadable or truncated checkpoint: "
                              f"{_first_line(error)}") from error


def _first_line(error):
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _get_tensor(reader, name, path):
    try:
        return reader.get_tensor(name)
    except Exception as error:  # pylint: disable=broad-except  (OpError, IndexError, ...)
        raise CheckpointError(f"{path}: cannot read variable {name!r} (truncated or corrupt "
                              f"checkpoint?): {_first_line(error)}") from error


def _checkpoint_shapes(prefix, path=None):
    reader = _open_checkpoint(prefix, path)
    try:
        return reader, reader.get_variable_to_shape_map()
    except tf.errors.OpError as error:
        raise CheckpointError(f"{path or prefix}: unreadable checkpoint: "
                              f"{_first_line(error)}") from error


def checkpoint_variables(path):
    """`{name: shape}` of the variables of a TF checkpoint (prefix, file or directory)."""
    path = os.fspath(path)
    _, shapes = _checkpoint_shapes(resolve_checkpoint_prefix(path), path)
    return {name: tuple(shape) for name, shape in shapes.items()}


def detect_format(path):
    """Guesses the format of `path` (one of `FORMATS`) from its name and contents.

    `.keras` files and `.h5` / `.weights.h5` files are told apart by their
    magic bytes; TF checkpoints (prefix, any of their files, or a directory)
    are `tf1_meta` when a `.meta` graph sits next to them, `tf2` when they hold
    an object graph, and `slim` when their variables are named
    `resnet_v2_N/...`.

    Raises:
      FileNotFoundError: nothing at `path`.
      CheckpointError: a file of no known format.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        magic = _magic(path)
        if magic.startswith(_ZIP_MAGIC) or path.endswith(".keras"):
            return FORMAT_KERAS
        if magic.startswith(_HDF5_MAGIC) or path.endswith((".h5", ".hdf5")):
            return FORMAT_KERAS_WEIGHTS
    prefix = resolve_checkpoint_prefix(path)
    if os.path.exists(prefix + ".meta"):
        return FORMAT_TF1_META
    _, shapes = _checkpoint_shapes(prefix, path)
    if _TF2_GRAPH_KEY in shapes:
        return FORMAT_TF2
    if any(_SLIM_SCOPE.match(name) for name in shapes):
        return FORMAT_SLIM
    raise CheckpointError(
        f"{path}: a name-based (TF1) checkpoint without a .meta graph and without "
        "TF-slim resnet_v2 variable names: its layer geometry is unknown. Pass the "
        f"{prefix + '.meta'!r} graph next to it.")


# ---------------------------------------------------------------------------
# Keras models and geometry.


def _records_from_operators(operators, values):
    """`LayerRecord`s from `LayerOperator`s and kernel values keyed by variable path."""
    records = []
    for op in operators:
        value = values[op.variable.path]
        kernel = np.asarray(op.to_spectral(np.asarray(value)))
        records.append(LayerRecord(op.name, kernel, op.geometry))
    return records


def _model_operators(model):
    # Each layer with its own zero padding: certified bounds, any stride.
    return geometry_lib.model_geometry(model)


def model_records(model):
    """The `LayerRecord`s of a built Keras model's current weights."""
    operators = _model_operators(model)
    return _records_from_operators(
        operators, {op.variable.path: op.variable.numpy() for op in operators})


def read_keras_model_file(path):
    """Reads a `.keras` model file, in Keras' safe mode (no code from the file runs).

    Custom layers or constraints must be registered (imported) before calling.

    Returns:
      A list of `LayerRecord`, one per linear-operator kernel of the model.

    Raises:
      FileNotFoundError: no file at `path`.
      CheckpointError: not a readable `.keras` file.
    """
    return model_records(load_keras_model_file(path))


def load_keras_model_file(path):
    """The model of a `.keras` file, loaded in Keras' safe mode (no code from the
    file runs); raises as `read_keras_model_file`."""
    # Registers tfconvnorm's serializable constraints / regularizers.
    from tfconvnorm import constraints  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

    path = os.fspath(path)
    _require_exists(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a .keras file (not a zip archive; truncated?)")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # pylint: disable=broad-except
        raise CheckpointError(f"{path}: cannot load the Keras model: "
                              f"{_first_line(error)}") from error
    return model


# ---------------------------------------------------------------------------
# TF2 object-based checkpoints.


def _escape_checkpoint_name(name):
    # As tf.train.Checkpoint escapes object names in its keys.
    return name.replace(".", "..").replace("/", ".S")


def tf2_checkpoint_keys(model, root_name="model"):
    """The checkpoint key of each of `model.weights` under `tf.train.Checkpoint(root_name=model)`.

    Follows `tf.train.Checkpoint`'s own breadth-first naming of objects, so
    a checkpoint can be checked and read variable by variable without
    restoring it.

    Returns:
      A dict variable path -> key.
    """
    root = tf.train.Checkpoint(**{root_name: model})
    paths = {id(root): ()}
    queue = collections.deque([root])
    while queue:
        obj = queue.popleft()
        for name, child in tf.train.TrackableView.children(obj).items():
            if id(child) not in paths:
                paths[id(child)] = paths[id(obj)] + (_escape_checkpoint_name(name),)
                queue.append(child)
    keys = {}
    for variable in model.weights:
        path = paths.get(id(variable))
        if path is None:
            path = paths.get(id(getattr(variable, "value", None)))
        if path is not None:
            keys[variable.path] = "/".join(path) + _TF2_VALUE_SUFFIX
    return keys


def read_tf2_checkpoint(path, model, root_name="model"):
    """Reads a TF2 checkpoint of `tf.train.Checkpoint(model=model)` (as `train.py` writes).

    Returns the `LayerRecord`s of `model`'s operators with the checkpoint's
    values; arguments and errors as `tf2_checkpoint_values`.
    """
    return _records_from_operators(_model_operators(model),
                                   tf2_checkpoint_values(path, model, root_name))


def tf2_checkpoint_values(path, model, root_name="model"):
    """Every variable of `model` from a TF2 checkpoint: `{variable path: value}`.

    Args:
      path: checkpoint prefix (`.../checkpoints/ckpt-3`), one of its files, or
        a directory (its latest checkpoint).
      model: a built Keras model of the architecture that was saved; its
        weights are not changed.
      root_name: the `tf.train.Checkpoint` attribute that held the model.

    Raises:
      FileNotFoundError, CheckpointError: as `read_tf1_meta_checkpoint`; a
        mismatch names the first model variable missing from the checkpoint
        or of another shape, or the first checkpoint variable the model lacks.
    """
    path = os.fspath(path)
    prefix = resolve_checkpoint_prefix(path)
    reader, shapes = _checkpoint_shapes(prefix, path)
    if _TF2_GRAPH_KEY not in shapes:
        raise CheckpointError(f"{path}: not a TF2 (object-based) checkpoint")
    keys = tf2_checkpoint_keys(model, root_name)
    for variable in model.weights:
        key = keys.get(variable.path)
        if key is None or key not in shapes:
            raise CheckpointError(
                f"{path}: does not match the architecture: variable {variable.path!r} "
                f"(checkpoint key {key!r}) is missing from the checkpoint")
        if tuple(shapes[key]) != tuple(variable.shape):
            # Keras 3 keys are positional (`_operations/N`): another depth or
            # layer order shows up as a shape mismatch at the first shifted layer.
            raise CheckpointError(
                f"{path}: does not match the architecture: variable {variable.path!r} "
                f"(checkpoint key {key!r}) has shape {tuple(shapes[key])} in the checkpoint, "
                f"the architecture expects {tuple(variable.shape)}")
    expected = set(keys.values())
    # A compiled model's checkpoint also holds its optimizer (not weights).
    optimizer = f"{root_name}/optimizer/"
    for key in sorted(shapes):
        if (key.startswith(root_name + "/") and not key.startswith(optimizer)
                and _TF2_SLOT_MARKER not in key and key not in expected):
            raise CheckpointError(
                f"{path}: does not match the architecture: checkpoint variable {key!r} "
                f"(shape {tuple(shapes[key])}) has no counterpart in the model")
    return {variable.path: _get_tensor(reader, keys[variable.path], path)
            for variable in model.weights}


# ---------------------------------------------------------------------------
# TF1 name-based checkpoints with a .meta graph.


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
                              f"{_first_line(error)}") from error
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
                                  f"{_first_line(error)}") from error
    return graph


def _data_shape(op):
    """Shape of the feature map the conv (or transposed conv: its output) acts on."""
    return op.outputs[0].shape if op.type == "Conv2DBackpropInput" else op.inputs[0].shape


def _static_input_size(op):
    shape = _data_shape(op)
    return shape.rank == 4 and None not in shape.as_list()[1:]


def _tf1_geometry(op, image_size_hint, meta_path):
    """`ConvGeometry` and kernel shape of one TF1 conv op."""
    channels_first = op.get_attr("data_format") in (b"NCHW", "NCHW")
    spatial_axes = (2, 3) if channels_first else (1, 2)
    strides = tuple(int(op.get_attr("strides")[a]) for a in spatial_axes)
    dilations = tuple(int(op.get_attr("dilations")[a]) for a in spatial_axes)
    padding = op.get_attr("padding")
    padding = (padding.decode() if isinstance(padding, bytes) else padding).lower()
    if padding == "explicit":
        pads = list(op.get_attr("explicit_paddings"))
        padding = tuple((int(pads[2 * a]), int(pads[2 * a + 1])) for a in spatial_axes)
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
    _require_exists(path, meta_path)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path}: no .meta graph ({meta_path!r} is missing)")
    reader, shapes = _checkpoint_shapes(prefix, path)
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
        value = _get_tensor(reader, name, path)
        kernel = value.reshape(geometry.kernel_shape)  # depthwise (k, k, c, m) -> (k, k, 1, c*m)
        label = name if len(by_variable[name]) == 1 else f"{name}@{op_name}"
        records.append(LayerRecord(label, kernel, geometry))
    return records


# ---------------------------------------------------------------------------
# TF-slim ResNet V2 checkpoints.


def _slim_shape_matches(stored, expected, classifier):
    """Slim stores the classifier as a 1x1 conv, with one extra (background) class."""
    stored, expected = tuple(stored), tuple(expected)
    if stored == expected:
        return True
    if not classifier:
        return False
    squeezed = stored
    while len(squeezed) > len(expected) and squeezed[0] == 1:
        squeezed = squeezed[1:]
    return (len(squeezed) == len(expected) and squeezed[:-1] == expected[:-1]
            and squeezed[-1] in (expected[-1], expected[-1] + 1))


def read_slim_resnet_v2(path, model, name_map):
    """Reads a TF-slim checkpoint (no graph) against a Keras model of the same layout.

    Args:
      path: checkpoint prefix, one of its files, or a directory.
      model: a built Keras model giving the geometry (e.g.
        `models.imagenet_resnet_v2.build_resnet_v2(50, image_size)`).
      name_map: callable Keras variable path -> slim variable name (e.g.
        `lambda p: keras_to_slim(p, 50)`).

    Returns:
      `LayerRecord`s named by the slim variables. The classifier is analysed
      as stored: slim's 1x1 logits conv `(1, 1, 2048, 1001)` becomes the
      `(2048, 1001)` matrix of a Dense operator.

    Raises:
      FileNotFoundError, CheckpointError: a missing, unreadable or
        mismatching checkpoint; a mismatch names the first slim variable that
        is missing or of another shape, or the first variable of the scope the
        model does not have.
    """
    path = os.fspath(path)
    prefix = resolve_checkpoint_prefix(path)
    reader, shapes = _checkpoint_shapes(prefix, path)
    classifier_variables = {
        id(v) for layer in model._flatten_layers(include_self=False, recursive=True)  # pylint: disable=protected-access
        if isinstance(layer, keras.layers.Dense) for v in layer.weights}
    names = {}
    for variable in model.weights:
        try:
            name = name_map(variable.path)
        except ValueError as error:
            raise CheckpointError(f"{path}: the architecture's variable {variable.path!r} "
                                  f"has no slim name: {error}") from error
        classifier = id(variable) in classifier_variables
        if name not in shapes:
            scopes = sorted({m.group(1) for m in map(_SLIM_SCOPE.match, shapes) if m})
            raise CheckpointError(
                f"{path}: does not match the architecture: variable {name!r} (Keras "
                f"{variable.path!r}) is missing; the checkpoint's slim scopes are {scopes}")
        if not _slim_shape_matches(shapes[name], variable.shape, classifier):
            raise CheckpointError(
                f"{path}: does not match the architecture: variable {name!r} has shape "
                f"{tuple(shapes[name])} in the checkpoint, the architecture expects "
                f"{tuple(variable.shape)} (Keras {variable.path!r})")
        names[variable.path] = name
    mapped = set(names.values())
    scopes = {name.split("/", 1)[0] for name in mapped}
    for name in sorted(shapes):
        if name.split("/", 1)[0] not in scopes or name in mapped:
            continue
        # Optimizer slots (`.../weights/Momentum`) and EMA copies of known variables.
        if any(name.startswith(m + "/") for m in mapped):
            continue
        raise CheckpointError(
            f"{path}: does not match the architecture: checkpoint variable {name!r} (shape "
            f"{tuple(shapes[name])}) has no counterpart in the model")
    records = []
    for op in _model_operators(model):
        name = names[op.variable.path]
        value = _get_tensor(reader, name, path)
        geometry = op.geometry
        if geometry.kind == geometry_lib.KIND_DENSE:
            value = value.reshape(value.shape[-2], value.shape[-1])
            geometry = dataclasses.replace(geometry, kernel_shape=tuple(value.shape))
        else:
            value = np.asarray(op.to_spectral(value))
        records.append(LayerRecord(name, value, geometry))
    return records


# ---------------------------------------------------------------------------
# Keras weight files (.h5 / .weights.h5).


def _h5py():
    import h5py  # pylint: disable=g-import-not-at-top  (a Keras dependency)
    return h5py


def _open_h5(path):
    path = os.fspath(path)
    _require_exists(path)
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise CheckpointError(f"{path}: not a readable HDF5 weights file (truncated?): "
                              f"{_first_line(error)}") from error


def _decode(name):
    return name.decode("utf8") if isinstance(name, bytes) else str(name)


def _legacy_group(h5_file):
    """The group holding legacy (Keras 2 / `keras.applications`) weights, or None."""
    if "layer_names" in h5_file.attrs:
        return h5_file
    if "model_weights" in h5_file and "layer_names" in h5_file["model_weights"].attrs:
        return h5_file["model_weights"]
    return None


def keras_weights_layer_names(path):
    """Names of the layers (legacy `.h5`) or weight groups (`.weights.h5`) in a weights file."""
    with _open_h5(path) as f:
        group = _legacy_group(f)
        if group is not None:
            return [_decode(n) for n in group.attrs["layer_names"]]
        if "layers" in f:
            return sorted(f["layers"].keys())
        return []


def _h5_datasets(group):
    h5py = _h5py()
    found = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found[name] = obj
    group.visititems(visit)
    return found


def _legacy_values(group, model, path):
    """Values of a legacy weights file, matched layer by layer by name."""
    saved = [_decode(n) for n in group.attrs["layer_names"]]
    saved = [n for n in saved if n in group and len(group[n].attrs.get("weight_names", []))]
    layers = [layer for layer in model.layers if layer.weights]
    expected = [layer.name for layer in layers]
    for name in expected:
        if name not in saved:
            raise CheckpointError(f"{path}: does not match the architecture: layer {name!r} "
                                  "has no weights in the file")
    for name in saved:
        if name not in expected:
            raise CheckpointError(f"{path}: does not match the architecture: the file holds "
                                  f"weights of layer {name!r}, which the model lacks")
    values = {}
    for layer in layers:
        weight_names = [_decode(n) for n in group[layer.name].attrs["weight_names"]]
        variables = list(layer.trainable_weights) + list(layer.non_trainable_weights)
        if len(weight_names) != len(variables):
            raise CheckpointError(
                f"{path}: does not match the architecture: layer {layer.name!r} has "
                f"{len(weight_names)} weights in the file, the model {len(variables)}")
        for variable, weight_name in zip(variables, weight_names):
            value = group[layer.name][weight_name]
            if tuple(value.shape) != tuple(variable.shape):
                raise CheckpointError(
                    f"{path}: does not match the architecture: variable {weight_name!r} has "
                    f"shape {tuple(value.shape)} in the file, the architecture expects "
                    f"{tuple(variable.shape)} ({variable.path!r})")
            values[variable.path] = value[()]
    return values


def _keras3_layout(model):
    """h5 dataset path -> variable, for the `.weights.h5` files Keras 3 writes.

    Keras names the datasets by its own traversal of the model; rather than
    re-deriving it, each variable is set to a distinct marker value, the
    model's weights are saved to a temporary file, and the markers are read
    back. The model's values are restored afterwards.
    """
    variables = list(model.weights)
    originals = [np.array(v.numpy()) for v in variables]
    layout = {}
    try:
        for index, variable in enumerate(variables):
            variable.assign(np.full(variable.shape, index, dtype=originals[index].dtype))
        with tempfile.TemporaryDirectory() as tmp:
            layout_path = os.path.join(tmp, "layout.weights.h5")
            model.save_weights(layout_path)
            with _h5py().File(layout_path, "r") as f:
                for name, dataset in _h5_datasets(f).items():
                    if dataset.size:
                        layout[name] = variables[int(np.asarray(dataset[()]).flat[0])]
    finally:
        for variable, value in zip(variables, originals):
            variable.assign(value)
    return layout


def _keras3_values(h5_file, model, path):
    layout = _keras3_layout(model)
    stored = {name: d for name, d in _h5_datasets(h5_file).items()
              if not name.startswith("optimizer/")}
    by_variable = {id(v): name for name, v in layout.items()}
    values = {}
    for variable in model.weights:
        name = by_variable.get(id(variable))
        if name is None:
            continue
        if name not in stored:
            raise CheckpointError(
                f"{path}: does not match the architecture: variable {variable.path!r} "
                f"(dataset {name!r}) is missing from the file")
        if tuple(stored[name].shape) != tuple(variable.shape):
            raise CheckpointError(
                f"{path}: does not match the architecture: variable {variable.path!r} "
                f"(dataset {name!r}) has shape {tuple(stored[name].shape)} in the file, the "
                f"architecture expects {tuple(variable.shape)}")
        values[variable.path] = stored[name][()]
    for name in sorted(stored):
        if name not in layout and stored[name].size:
            raise CheckpointError(
                f"{path}: does not match the architecture: dataset {name!r} (shape "
                f"{tuple(stored[name].shape)}) has no counterpart in the model")
    return values


def read_keras_weights_file(path, model):
    """Reads a Keras weights file against a built model of the same architecture.

    Both kinds are read: legacy `.h5` files (Keras 2, `keras.applications`'
    downloads; matched by layer name) and Keras 3 `.weights.h5` files
    (matched by Keras' own layout). The model's weights are not changed.

    Raises:
      FileNotFoundError, CheckpointError: a missing, unreadable or mismatching
        file; a mismatch names the first mismatching layer or variable.
    """
    return _records_from_operators(_model_operators(model), keras_weights_values(path, model))


def keras_weights_values(path, model):
    """Every variable of `model` from a Keras weights file: `{variable path: value}`
    (arguments and errors as `read_keras_weights_file`)."""
    path = os.fspath(path)
    with _open_h5(path) as f:
        group = _legacy_group(f)
        try:
            if group is not None:
                values = _legacy_values(group, model, path)
            else:
                values = _keras3_values(f, model, path)
        except (OSError, KeyError) as error:
            raise CheckpointError(f"{path}: unreadable weights file (truncated?): "
                                  f"{_first_line(error)}") from error
    return values


# ---------------------------------------------------------------------------
# Spectra and their files.


@dataclasses.dataclass(frozen=True, eq=False)
class LayerSpectrum:
    """One layer's spectrum (sorted descending), its geometry, and a certified
    interval for its norm.

    `singular_values` are those `tfconvnorm.conv_singular_values` gives for
    the geometry: with the layer's zero padding, entrywise upper bounds on
    the layer's singular values. `sigma_max_lower <= ||layer|| <=
    sigma_max_upper` (float64, `conv_operator_norm_bounds`); NaN when the
    bounds were not computed.
    """

    name: str
    geometry: geometry_lib.ConvGeometry
    singular_values: np.ndarray
    sigma_max_lower: float = math.nan
    sigma_max_upper: float = math.nan

    @property
    def count(self):
        return int(self.singular_values.shape[0])

    @property
    def sigma_max(self):
        return float(self.singular_values[0]) if self.count else 0.0

    @property
    def sigma_min(self):
        return float(self.singular_values[-1]) if self.count else 0.0

    @property
    def condition_number(self):
        """sigma_max / sigma_min; inf for a singular operator."""
        return self.sigma_max / self.sigma_min if self.sigma_min > 0 else math.inf

    @property
    def is_1x1(self):
        """A convolution whose kernel is 1 on every spatial axis (Dense excluded)."""
        spatial = self.geometry.kernel_shape[:-2]
        return bool(spatial) and all(k == 1 for k in spatial)


#: Layers whose spectra `layer_spectra` computes in one pooled call: a bound
#: on memory (every per-frequency matrix of a chunk exists at once).
_SPECTRA_CHUNK = 8


def layer_spectra(records, dtype="float32", progress=False, bounds=True,
                  bound_iterations=spectral.DEFAULT_POWER_ITERATIONS):
    """Every singular value of each record's operator, through the spectral core.

    Args:
      records: `LayerRecord`s.
      dtype: "float32" or "float64": the kernels are cast to it.
      progress: show a Keras progress bar over the layers.
      bounds: also compute each layer's certified norm interval (Lanczos on
        the real layer for the lower end).
      bound_iterations: Lanczos iterations for the lower bounds.

    Returns:
      A list of `LayerSpectrum`, in the order of `records`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    bar = None
    if progress and records:
        bar = keras.utils.Progbar(len(records), unit_name="layer")
    result = []
    for start in range(0, len(records), _SPECTRA_CHUNK):
        chunk = records[start:start + _SPECTRA_CHUNK]
        kernels = [tf.cast(tf.convert_to_tensor(r.kernel), dtype) for r in chunk]
        geometries = [r.geometry for r in chunk]
        values = spectral.conv_singular_values_many(kernels, geometries)
        intervals = (spectral.conv_operator_norm_bounds_many(kernels, geometries,
                                                             iterations=bound_iterations)
                     if bounds else [(math.nan, math.nan)] * len(chunk))
        for record, spectrum, (lower, upper) in zip(chunk, values, intervals):
            result.append(LayerSpectrum(record.name, record.geometry, spectrum.numpy(),
                                        float(lower), float(upper)))
        if bar is not None:
            bar.update(len(result))
    return result


def atomic_write(path, write):
    """Calls `write(binary_file)` on a temporary file next to `path`, then renames it.

    Readers never see a half-written `path`; on error the temporary file is
    removed and `path` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        # mkstemp makes the file private; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _dims(values):
    return "x".join(str(int(v)) for v in values)


def padding_text(padding):
    """A geometry's padding as text: the mode's name, or explicit pads as
    "(b, a)x(b, a)" per axis (`parse_padding_text` reads it back)."""
    if isinstance(padding, str):
        return padding
    return "x".join(f"({b}, {a})" for b, a in padding)


def parse_padding_text(text):
    """Inverse of `padding_text`."""
    if not text.startswith("("):
        return text
    return tuple(tuple(int(v) for v in pair.strip("()").split(","))
                 for pair in text.split("x"))


def write_spectra_npz(path, spectra, metadata=None):
    """Writes the spectra to an `.npz` loadable with `np.load(path)` (no pickle).

    Keys: `names` (str), `sv/<i>` (all singular values of layer i, sorted
    descending: for a zero-padded layer, entrywise upper bounds on its own),
    per-layer `kernel_shape/<i>`, `input_shape/<i>`, `strides/<i>`,
    `dilation_rate/<i>`, `embedding_shape/<i>` (the circular size N whose
    spectrum `sv/<i>` is) (int64), and the vectors `groups`, `kinds`,
    `padding` (`padding_text`), `layer_padding`, `approximate`, `sigma_max`,
    `sigma_min`, `count`, `sigma_max_lower`, `sigma_max_upper` (the certified
    interval of the layer's norm); `meta/<key>` holds `metadata` values as
    strings. Written atomically.
    """
    arrays = {
        "names": np.array([s.name for s in spectra], dtype=str),
        "kinds": np.array([s.geometry.kind for s in spectra], dtype=str),
        "padding": np.array([padding_text(s.geometry.padding) for s in spectra], dtype=str),
        "layer_padding": np.array([s.geometry.layer_padding or "" for s in spectra], dtype=str),
        "groups": np.array([s.geometry.groups for s in spectra], dtype=np.int64),
        "approximate": np.array([s.geometry.approximate for s in spectra], dtype=bool),
        "sigma_max": np.array([s.sigma_max for s in spectra], dtype=np.float64),
        "sigma_min": np.array([s.sigma_min for s in spectra], dtype=np.float64),
        "count": np.array([s.count for s in spectra], dtype=np.int64),
        "sigma_max_lower": np.array([s.sigma_max_lower for s in spectra], dtype=np.float64),
        "sigma_max_upper": np.array([s.sigma_max_upper for s in spectra], dtype=np.float64),
    }
    for index, s in enumerate(spectra):
        arrays[f"sv/{index}"] = np.asarray(s.singular_values)
        for field in ("kernel_shape", "input_shape", "strides", "dilation_rate",
                      "embedding_shape"):
            arrays[f"{field}/{index}"] = np.array(getattr(s.geometry, field), dtype=np.int64)
    for key, value in (metadata or {}).items():
        arrays[f"meta/{key}"] = np.array(str(value))
    atomic_write(os.fspath(path), lambda f: np.savez(f, **arrays))


def read_spectra_npz(path):
    """Reads `write_spectra_npz` output back: `(list of LayerSpectrum, metadata dict)`."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        spectra = []
        for index, name in enumerate(names):
            geometry = geometry_lib.ConvGeometry(
                kernel_shape=tuple(int(v) for v in data[f"kernel_shape/{index}"]),
                input_shape=tuple(int(v) for v in data[f"input_shape/{index}"]),
                strides=tuple(int(v) for v in data[f"strides/{index}"]),
                dilation_rate=tuple(int(v) for v in data[f"dilation_rate/{index}"]),
                groups=int(data["groups"][index]), kind=str(data["kinds"][index]),
                padding=parse_padding_text(str(data["padding"][index])),
                approximate=bool(data["approximate"][index]),
                layer_padding=str(data["layer_padding"][index]) or None)
            spectra.append(LayerSpectrum(name, geometry, data[f"sv/{index}"],
                                         float(data["sigma_max_lower"][index]),
                                         float(data["sigma_max_upper"][index])))
        metadata = {key[len("meta/"):]: str(data[key]) for key in data.files
                    if key.startswith("meta/")}
    return spectra, metadata


SUMMARY_COLUMNS = ("index", "name", "kind", "kernel_shape", "input_size", "strides",
                   "dilation_rate", "groups", "padding", "embedding_size", "approximate",
                   "sigma_max_lower", "sigma_max_upper", "sigma_max", "sigma_min",
                   "condition_number", "count", "note")


def _note(geometry):
    if geometry.approximate:
        return APPROXIMATE_NOTE
    if geometry.padding == spectral.CIRCULAR and geometry.layer_padding not in (None, "circular"):
        return CIRCULAR_NOTE
    if geometry.kind != geometry_lib.KIND_DENSE and geometry.padding != spectral.CIRCULAR:
        return BOUND_NOTE
    return ""


def _lipschitz_note(lipschitz, unavailable):
    if lipschitz is None:
        return f"not computed: {unavailable or 'no model'}"
    top = ", ".join(f"{f.name} {f.factor:.4g}" for f in lipschitz.top_contributors(5))
    return f"{LIPSCHITZ_NOTE}; largest factors: {top}"


def summary_rows(spectra, lipschitz=None, unavailable=None):
    """One dict per layer (columns `SUMMARY_COLUMNS`), then the model's row.

    `sigma_max_lower` / `sigma_max_upper` bound the layer's norm; `sigma_max`,
    `sigma_min` and `condition_number` are those of the spectrum written to
    spectra.npz (the note says whether it bounds the layer's). The last row
    holds `lipschitz` (a `tfconvnorm.LipschitzBound`) under `sigma_max_upper`,
    or says why there is none (`unavailable`)."""
    rows = []
    for index, s in enumerate(spectra):
        g = s.geometry
        rows.append({
            "index": index, "name": s.name, "kind": g.kind,
            "kernel_shape": _dims(g.kernel_shape), "input_size": _dims(g.input_shape),
            "strides": _dims(g.strides), "dilation_rate": _dims(g.dilation_rate),
            "groups": g.groups, "padding": padding_text(g.padding),
            "embedding_size": _dims(g.embedding_shape), "approximate": g.approximate,
            "sigma_max_lower": repr(s.sigma_max_lower), "sigma_max_upper": repr(s.sigma_max_upper),
            "sigma_max": repr(s.sigma_max), "sigma_min": repr(s.sigma_min),
            "condition_number": repr(s.condition_number), "count": s.count,
            "note": _note(g),
        })
    rows.append({column: "" for column in SUMMARY_COLUMNS} | {
        "name": LIPSCHITZ_ROW_NAME,
        "sigma_max_upper": "" if lipschitz is None else repr(float(lipschitz)),
        "note": _lipschitz_note(lipschitz, unavailable)})
    return rows


def write_summary_csv(path, spectra, lipschitz=None, unavailable=None):
    """Writes `summary_rows(spectra, lipschitz, unavailable)` as CSV, atomically."""
    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(summary_rows(spectra, lipschitz, unavailable))
        f.write(text.getvalue().encode("utf8"))
    atomic_write(os.fspath(path), write)


def format_summary_table(spectra, max_name=40, lipschitz=None, unavailable=None):
    """A plain-text table of the summary, for the terminal, ending on the
    model's certified Lipschitz bound (or why there is none)."""
    header = (f"{'#':>3}  {'layer':<{max_name}}  {'kernel':>14}  {'input':>9}  {'stride':>6}  "
              f"{'padding':>8}  {'N':>9}  {'lower':>9}  {'upper':>9}  {'sigma_min':>9}  "
              f"{'count':>8}")
    lines = [header, "-" * len(header)]
    for index, s in enumerate(spectra):
        g = s.geometry
        name = s.name if len(s.name) <= max_name else "..." + s.name[-(max_name - 3):]
        mark = "*" if g.approximate else ""
        padding = "explicit" if not isinstance(g.padding, str) else g.padding
        lines.append(
            f"{index:>3}  {name:<{max_name}}  {_dims(g.kernel_shape):>14}  "
            f"{_dims(g.input_shape) + mark or '-':>9}  {_dims(g.strides) or '-':>6}  "
            f"{padding:>8}  {_dims(g.embedding_shape) or '-':>9}  "
            f"{s.sigma_max_lower:>9.4g}  {s.sigma_max_upper:>9.4g}  {s.sigma_min:>9.4g}  "
            f"{s.count:>8}")
    lines.append("-" * len(header))
    lines.append("lower <= ||layer|| <= upper (certified); sigma_min is the spectrum's: "
                 "for zero-padded layers an upper bound on the layer's, for circular ones "
                 "the circular operator's. N: the circular size whose spectrum bounds the "
                 "layer.")
    if lipschitz is not None:
        lines.append(lipschitz.summary())
    else:
        lines.append(f"no Lipschitz bound of the model: {unavailable or 'no model'}")
    if any(s.geometry.approximate for s in spectra):
        lines.append(f"* {APPROXIMATE_NOTE}")
    return "\n".join(lines)
