"""Files on disk: existence, magic bytes, and TF checkpoints (prefixes, variables)."""

import os
import re

import tensorflow as tf

from tfconvnorm.checkpoints.records import CheckpointError, first_line

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: The key that marks an object-based (TF2) checkpoint.
TF2_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def require_exists(path, *candidates):
    """Raises FileNotFoundError naming `path` unless it or a candidate exists."""
    if not any(os.path.exists(p) for p in (path,) + candidates):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")


def file_magic(path, size=8):
    """The first `size` bytes of a file (empty where it cannot be read)."""
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
