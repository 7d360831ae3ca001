"""Kernels of trained and pretrained networks, each with its geometry, and their spectra.

`read(path)` detects the format, resolves the architecture where the file has
none, and returns a `Checkpoint`: the `LayerRecord`s (name, kernel in the
spectral core's layout, `ConvGeometry`) and, where one can be built, a Keras
model holding the checkpoint's values (for `tfconvnorm.lipschitz_bound`).
`layer_spectra` runs the spectral core on the records; the writers store the
result (`spectra.npz`, `summary.csv`). One module per format:

    format          module          geometry from
    keras           keras_file      the model in the file (Keras safe mode)
    tf2             tf2             the CIFAR ResNet V2 of the run's config.json
    tf1_meta        tf1_meta        the conv ops of the `.meta` graph
    slim            slim            the ImageNet ResNet V2 + slim's names
    keras_weights   keras_weights   the ImageNet ResNet V2 (layer names) or config.json
    savedmodel      savedmodel      the conv / matmul ops of the serving functions

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

import dataclasses
import os
import typing

from tfconvnorm.checkpoints import architectures
from tfconvnorm.checkpoints.common import (DTYPES, FORMAT_KERAS, FORMAT_KERAS_WEIGHTS,
                                           FORMAT_SAVEDMODEL, FORMAT_SLIM, FORMAT_TF1_META,
                                           FORMAT_TF2, FORMATS, CheckpointError, LayerRecord,
                                           checkpoint_variables, detect_format, model_operators,
                                           model_records, records_from_operators,
                                           resolve_checkpoint_prefix)
from tfconvnorm.checkpoints.keras_file import load_keras_model_file, read_keras_model_file
from tfconvnorm.checkpoints.keras_weights import (keras_weights_layer_names,
                                                  keras_weights_values, read_keras_weights_file)
from tfconvnorm.checkpoints.results import (APPROXIMATE_NOTE, BOUND_NOTE, CIRCULAR_NOTE,
                                            LIPSCHITZ_NOTE, LIPSCHITZ_ROW_NAME,
                                            SPECTRA_FILENAME, SUMMARY_COLUMNS, SUMMARY_FILENAME,
                                            LayerSpectrum, format_summary_table, layer_spectra,
                                            padding_text, parse_padding_text, read_spectra_npz,
                                            summary_rows, write_spectra_npz, write_summary_csv)
from tfconvnorm.checkpoints.savedmodel import read_savedmodel
from tfconvnorm.checkpoints.slim import read_slim_resnet_v2
from tfconvnorm.checkpoints.tf1_meta import read_tf1_meta_checkpoint
from tfconvnorm.checkpoints.tf2 import (read_tf2_checkpoint, tf2_checkpoint_keys,
                                        tf2_checkpoint_values)


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """What `read` found.

    Attributes:
      path: the checkpoint as given.
      format: one of `FORMATS`.
      records: the `LayerRecord`s, in the model's (or graph's) order.
      architecture: what the geometry came from, in words.
      model: a Keras model holding the checkpoint's values, or None.
      no_model: why there is no model (None when there is one).
    """

    path: str
    format: str
    records: list
    architecture: str
    model: typing.Any = None
    no_model: str = None


def _with_values(model, values):
    """A model built here, given the checkpoint's values."""
    for variable in model.weights:
        if variable.path in values:
            variable.assign(values[variable.path])
    return model


def _read_tf2(path, family, depth, image_size):
    prefix = resolve_checkpoint_prefix(path)
    config, config_path = architectures.find_run_config(path, prefix)
    if family is None:
        family, depth = architectures.architecture_family(
            architectures.config_value(config, "architecture")
            or architectures.CIFAR_ARCHITECTURE, depth)
    if family == "imagenet":
        model, description = architectures.build_imagenet(depth, image_size)
    else:
        model, description = architectures.build_cifar(depth, image_size, config, config_path)
    values = tf2_checkpoint_values(prefix, model)
    records = records_from_operators(model_operators(model), values)
    return records, description, _with_values(model, values), None


def _read_slim(path, family, depth, image_size):
    from tfconvnorm.models import imagenet_resnet_v2  # pylint: disable=import-outside-toplevel
    variables = checkpoint_variables(path)
    scopes = sorted({name.split("/", 1)[0] for name in variables
                     if name.startswith("resnet_v2_")})
    if family is None:
        if len(scopes) != 1:
            raise ValueError(f"--architecture is needed: {path} holds the slim scopes {scopes}")
        family, depth = architectures.architecture_family(scopes[0], None)
    if family != "imagenet":
        raise ValueError(f"slim checkpoints are ImageNet ResNet V2s; "
                         f"--architecture={architectures.CIFAR_ARCHITECTURE} does not apply")
    scope = imagenet_resnet_v2.slim_scope(depth)
    model, description = architectures.build_imagenet(
        depth, image_size, include_top=f"{scope}/logits/weights" in variables)
    records = read_slim_resnet_v2(path, model,
                                  lambda name: imagenet_resnet_v2.keras_to_slim(name, depth))
    return (records, description + " (slim names)", None,
            "slim checkpoints hold a 1001-class classifier the rebuilt model lacks")


def _read_keras_weights(path, family, depth, image_size):
    from tfconvnorm.models import imagenet_resnet_v2  # pylint: disable=import-outside-toplevel
    names = keras_weights_layer_names(path)
    if family is None:
        depth = imagenet_resnet_v2.depth_from_weight_names(names)
        if depth is None:
            raise ValueError(f"--architecture is needed: {path} is not recognisably a "
                             "ResNet50V2/101V2/152V2 weights file")
        family = "imagenet"
    if family == "imagenet":
        model, description = architectures.build_imagenet(
            depth, image_size, include_top=imagenet_resnet_v2.has_classifier(names))
    else:
        config, config_path = architectures.find_run_config(path)
        model, description = architectures.build_cifar(depth, image_size, config, config_path)
    values = keras_weights_values(path, model)
    records = records_from_operators(model_operators(model), values)
    return records, description, _with_values(model, values), None


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
    fmt = format or detect_format(path)
    if fmt == FORMAT_KERAS:
        model = load_keras_model_file(path)
        found = model_records(model), "model from the .keras file", model, None
    elif fmt == FORMAT_TF1_META:
        found = (read_tf1_meta_checkpoint(path, image_size=image_size),
                 "graph from the .meta file", None, "a TF1 graph, not a Keras model")
    elif fmt == FORMAT_SAVEDMODEL:
        found = (read_savedmodel(path, image_size=image_size),
                 "functions of the SavedModel", None, "a SavedModel is read as graphs, not "
                 "loaded as a Keras model")
    elif fmt == FORMAT_TF2:
        found = _read_tf2(path, family, depth, image_size)
    elif fmt == FORMAT_SLIM:
        found = _read_slim(path, family, depth, image_size)
    else:
        found = _read_keras_weights(path, family, depth, image_size)
    records, description, model, no_model = found
    return Checkpoint(path, fmt, records, description, model, no_model)
