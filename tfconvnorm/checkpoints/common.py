"""What every reader shares: formats, records, errors, checkpoint files, model records."""

import os
import re
import typing

import numpy as np
import tensorflow as tf

from tfconvnorm import geometry as geometry_lib


FORMAT_KERAS = "keras"
FORMAT_TF2 = "tf2"
FORMAT_TF1_META = "tf1_meta"
FORMAT_SLIM = "slim"
FORMAT_KERAS_WEIGHTS = "keras_weights"
FORMAT_SAVEDMODEL = "savedmodel"
FORMATS = (FORMAT_KERAS, FORMAT_TF2, FORMAT_TF1_META, FORMAT_SLIM, FORMAT_KERAS_WEIGHTS,
           FORMAT_SAVEDMODEL)
DTYPES = ("float32", "float64")


_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
TF2_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


SLIM_SCOPE = re.compile(r"^(resnet_v2_\d+)/")


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


def require_exists(path, *candidates):
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
    require_exists(path, prefix + ".index")
    if not os.path.exists(prefix + ".index"):
        raise CheckpointError(f"{path}: not a TF checkpoint: {prefix + '.index'!r} is missing")
    return prefix


def _open_checkpoint(prefix, path=None):
    try:
        return tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as error:
        raise CheckpointError(f"{path or prefix}: unreadable or truncated checkpoint: "
                              f"{first_line(error)}") from error


def first_line(error):
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def get_tensor(reader, name, path):
    try:
        return reader.get_tensor(name)
    except Exception as error:  # pylint: disable=broad-except  (OpError, IndexError, ...)
        raise CheckpointError(f"{path}: cannot read variable {name!r} (truncated or corrupt "
                              f"checkpoint?): {first_line(error)}") from error


def checkpoint_shapes(prefix, path=None):
    reader = _open_checkpoint(prefix, path)
    try:
        return reader, reader.get_variable_to_shape_map()
    except tf.errors.OpError as error:
        raise CheckpointError(f"{path or prefix}: unreadable checkpoint: "
                              f"{first_line(error)}") from error


def checkpoint_variables(path):
    """`{name: shape}` of the variables of a TF checkpoint (prefix, file or directory)."""
    path = os.fspath(path)
    _, shapes = checkpoint_shapes(resolve_checkpoint_prefix(path), path)
    return {name: tuple(shape) for name, shape in shapes.items()}


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


def detect_format(path):
    """Guesses the format of `path` (one of `FORMATS`) from its name and contents.

    A SavedModel is a directory holding `saved_model.pb` (or that file);
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
    if (os.path.basename(path) == "saved_model.pb" and os.path.isfile(path)) or \
            os.path.isfile(os.path.join(path, "saved_model.pb")):
        return FORMAT_SAVEDMODEL
    if os.path.isfile(path):
        magic = _magic(path)
        if magic.startswith(_ZIP_MAGIC) or path.endswith(".keras"):
            return FORMAT_KERAS
        if magic.startswith(_HDF5_MAGIC) or path.endswith((".h5", ".hdf5")):
            return FORMAT_KERAS_WEIGHTS
    prefix = resolve_checkpoint_prefix(path)
    if os.path.exists(prefix + ".meta"):
        return FORMAT_TF1_META
    _, shapes = checkpoint_shapes(prefix, path)
    if TF2_GRAPH_KEY in shapes:
        return FORMAT_TF2
    if any(SLIM_SCOPE.match(name) for name in shapes):
        return FORMAT_SLIM
    raise CheckpointError(
        f"{path}: a name-based (TF1) checkpoint without a .meta graph and without "
        "TF-slim resnet_v2 variable names: its layer geometry is unknown. Pass the "
        f"{prefix + '.meta'!r} graph next to it.")


def records_from_operators(operators, values):
    """`LayerRecord`s from `LayerOperator`s and kernel values keyed by variable path."""
    records = []
    for op in operators:
        value = values[op.variable.path]
        kernel = np.asarray(op.to_spectral(np.asarray(value)))
        records.append(LayerRecord(op.name, kernel, op.geometry))
    return records


def model_operators(model):
    # Each layer with its own zero padding: certified bounds, any stride.
    return geometry_lib.model_geometry(model)


def model_records(model):
    """The `LayerRecord`s of a built Keras model's current weights."""
    operators = model_operators(model)
    return records_from_operators(
        operators, {op.variable.path: op.variable.numpy() for op in operators})
