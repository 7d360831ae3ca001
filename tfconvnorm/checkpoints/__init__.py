"""Kernels of trained and pretrained networks, each with its geometry, and their spectra.

`read(path)` detects the format, resolves the architecture where the file has
none, and returns a `Checkpoint`: the `LayerRecord`s (name, kernel in the
spectral core's layout, `ConvGeometry`) and, where one can be built, a Keras
model holding the checkpoint's values (for `tfconvnorm.lipschitz_bound`).
`layer_spectra` runs the spectral core on the records; the writers store the
result (`spectra.npz`, `summary.csv`).

`READERS` is the table of formats, one module each, in the order `read` asks
them: each has `FORMAT`, `detect(path)` (True where the file is of its format)
and `read(path, family, depth, image_size)` returning a `Checkpoint`. A new
format is one module with those three names and one entry in `READERS`.

    format          module          geometry from
    savedmodel      savedmodel      the conv / matmul ops of the serving functions
    keras           keras_file      the model in the file (Keras safe mode)
    keras_weights   keras_weights   the ImageNet ResNet V2 (layer names) or config.json
    tf1_meta        tf1_meta        the conv ops of the `.meta` graph
    tf2             tf2             the CIFAR ResNet V2 of the run's config.json
    slim            slim            the ImageNet ResNet V2 + slim's names

Shared by the readers: `records` (the record types and the error),
`tf_checkpoint` (files, TF checkpoint prefixes and variables), `graph_ops` (TF
conv-op attributes), `architectures` (the networks rebuilt for formats that hold
values only).

Values are read directly from the files and compared, variable by variable,
with the architecture, so that a mismatch is reported by name instead of
surfacing deep inside TF or silently loading a subset. A model passed in is
never written into; the models in a `Checkpoint` are built here.

Every layer is described with its own zero padding, so the spectra are
certified entrywise upper bounds on the layer's singular values (the circular
convolution on the embedding size N that contains the layer), for any stride
and input size; `layer_spectra` adds a certified interval for each layer's
norm (`tfconvnorm.conv_operator_norm_bounds_many`).
"""

import os

from tfconvnorm.checkpoints import (keras_file, keras_weights, savedmodel, slim, tf1_meta,
                                    tf2)
from tfconvnorm.checkpoints import architectures
from tfconvnorm.checkpoints.keras_file import load_keras_model_file, read_keras_model_file
from tfconvnorm.checkpoints.keras_weights import read_keras_weights_file
from tfconvnorm.checkpoints.records import (Checkpoint, CheckpointError, LayerRecord,
                                            model_records)
from tfconvnorm.checkpoints.results import (DTYPES, LIPSCHITZ_NOTE, LIPSCHITZ_ROW_NAME,
                                            SPECTRA_FILENAME, SUMMARY_FILENAME, LayerSpectrum,
                                            format_summary_table, layer_spectra,
                                            read_spectra_npz, write_spectra_npz,
                                            write_summary_csv)
from tfconvnorm.checkpoints.savedmodel import read_savedmodel
from tfconvnorm.checkpoints.slim import read_slim_resnet_v2
from tfconvnorm.checkpoints.tf1_meta import read_tf1_meta_checkpoint
from tfconvnorm.checkpoints.tf2 import read_tf2_checkpoint
from tfconvnorm.checkpoints.tf_checkpoint import resolve_checkpoint_prefix

#: The formats, in the order `detect_format` asks them: the file-based ones
#: first, then the TF checkpoints (a `.meta` graph makes one `tf1_meta`
#: whatever its variables).
READERS = (savedmodel, keras_file, keras_weights, tf1_meta, tf2, slim)
FORMATS = tuple(reader.FORMAT for reader in READERS)
_READER_OF = {reader.FORMAT: reader for reader in READERS}

__all__ = [
    "DTYPES", "FORMATS", "LIPSCHITZ_NOTE", "LIPSCHITZ_ROW_NAME", "READERS", "SPECTRA_FILENAME",
    "SUMMARY_FILENAME", "Checkpoint", "CheckpointError", "LayerRecord", "LayerSpectrum",
    "detect_format", "format_summary_table", "layer_spectra", "load_keras_model_file",
    "model_records", "read", "read_keras_model_file", "read_keras_weights_file",
    "read_savedmodel", "read_slim_resnet_v2", "read_spectra_npz", "read_tf1_meta_checkpoint",
    "read_tf2_checkpoint", "resolve_checkpoint_prefix", "write_spectra_npz",
    "write_summary_csv",
]


def detect_format(path):
    """The format of `path` (one of `FORMATS`): the first of `READERS` whose
    `detect` claims it.

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
    for reader in READERS:
        if reader.detect(path):
            return reader.FORMAT
    prefix = resolve_checkpoint_prefix(path)
    raise CheckpointError(
        f"{path}: a name-based (TF1) checkpoint without a .meta graph and without "
        "TF-slim resnet_v2 variable names: its layer geometry is unknown. Pass the "
        f"{prefix + '.meta'!r} graph next to it.")


def read(path, format=None, architecture=None, depth=None, image_size=None):  # pylint: disable=redefined-builtin
    """Reads any supported checkpoint: the one entry point of this package.

    Args:
      path: a file or directory in one of `FORMATS`.
      format: one of `FORMATS`; None detects it (`detect_format`).
      architecture: one of `architectures.ARCHITECTURES`, for formats without a
        model (tf2, slim, keras_weights); None reads it from config.json (tf2),
        the variable names (slim) or the layer names (keras_weights).
      depth: the CIFAR ResNet V2's depth (default from config.json).
      image_size: input size of the rebuilt network (224 for ImageNet ResNets,
        config.json's or 32 for CIFAR); for TF1 graphs and SavedModels only
        where the graph leaves it open.

    Returns:
      A `Checkpoint`.

    Raises:
      FileNotFoundError: nothing at `path`.
      CheckpointError: unreadable or mismatching files (named).
      ValueError: bad arguments, or an architecture that cannot be resolved.
    """
    path = os.fspath(path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    family, depth = architectures.architecture_family(architecture, depth)
    reader = _READER_OF[format or detect_format(path)]
    return reader.read(path, family, depth, image_size)
