"""Keras weight files: legacy `.h5` (Keras 2, `keras.applications`' downloads)
and Keras 3 `.weights.h5`, read against an architecture."""

import os
import re

from tfconvnorm import _compat
from tfconvnorm.checkpoints import architectures
from tfconvnorm.checkpoints.records import (Checkpoint, CheckpointError, first_line,
                                            model_operators, records_from_operators, with_values)
from tfconvnorm.checkpoints.tf_checkpoint import HDF5_MAGIC, file_magic, require_exists

FORMAT = "keras_weights"


def detect(path):
    """A file with HDF5's magic bytes, or named `.h5` / `.hdf5`."""
    return os.path.isfile(path) and (file_magic(path).startswith(HDF5_MAGIC)
                                     or path.endswith((".h5", ".hdf5")))


def read(path, family=None, depth=None, image_size=None):
    """The `Checkpoint` of a Keras weights file, against the architecture given
    (`family`, `depth`) or, where none is, the ImageNet ResNet V2 its layer
    names show."""
    names = keras_weights_layer_names(path)
    if family is None:
        depth = depth_from_weight_names(names)
        if depth is None:
            raise ValueError(f"--architecture is needed: {path} is not recognisably a "
                             "ResNet50V2/101V2/152V2 weights file")
        family = "imagenet"
    if family == "imagenet":
        model, description = architectures.build_imagenet(
            depth, image_size, include_top=has_classifier(names))
    else:
        config, config_path = architectures.find_run_config(path)
        model, description = architectures.build_cifar(depth, image_size, config, config_path)
    values = keras_weights_values(path, model)
    records = records_from_operators(model_operators(model), values)
    return Checkpoint(path, FORMAT, records, description, with_values(model, values))


def depth_from_weight_names(names):
    """The depth of a ResNet V2 whose Keras weights file holds these layer names, or None.

    Legacy `.h5` files (`keras.applications`' downloads) name layers
    (`conv4_block23_1_conv`: conv4 has 6/23/36 blocks); Keras 3 `.weights.h5`
    files number them by class (`conv2d_103`: 53/104/155 convs).
    """
    from tfconvnorm.models.imagenet_resnet_v2 import STAGE_BLOCKS  # pylint: disable=import-outside-toplevel
    names = list(names)
    conv4_blocks = {int(m.group(1)) for m in map(re.compile(r"^conv4_block(\d+)_").match, names)
                    if m}
    for depth, blocks in STAGE_BLOCKS.items():
        if conv4_blocks and max(conv4_blocks) == blocks[2]:
            return depth
    convs = sum(1 for n in names if re.match(r"^conv2d(_\d+)?$", n))
    for depth, blocks in STAGE_BLOCKS.items():
        if convs and convs == 3 * sum(blocks) + len(blocks) + 1:
            return depth
    return None


def has_classifier(names):
    """Whether a Keras weights file with these layer names includes the classifier."""
    return any(n == "predictions" or re.match(r"^dense(_\d+)?$", n) for n in names)


def _h5py():
    import h5py  # pylint: disable=g-import-not-at-top  (a Keras dependency)
    return h5py


def _open_h5(path):
    path = os.fspath(path)
    require_exists(path)
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise CheckpointError(f"{path}: not a readable HDF5 weights file (truncated?): "
                              f"{first_line(error)}") from error


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


def _keras3_values(h5_file, model, path):
    layout = _compat.keras3_weights_layout(model)
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
    return records_from_operators(model_operators(model), keras_weights_values(path, model))


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
                                  f"{first_line(error)}") from error
    return values
