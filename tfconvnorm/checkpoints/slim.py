"""TF-slim ResNet V2 checkpoints (name-based), read against a Keras architecture and a
name map."""

import dataclasses
import os

import keras
import numpy as np

from tfconvnorm import _compat
from tfconvnorm import geometry as geometry_lib
from tfconvnorm.checkpoints.common import (SLIM_SCOPE, CheckpointError, LayerRecord,
                                           checkpoint_shapes, get_tensor, model_operators,
                                           resolve_checkpoint_prefix)


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
    reader, shapes = checkpoint_shapes(prefix, path)
    classifier_variables = {
        id(v) for layer in _compat.flatten_layers(model)
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
            scopes = sorted({m.group(1) for m in map(SLIM_SCOPE.match, shapes) if m})
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
    for op in model_operators(model):
        name = names[op.variable.path]
        value = get_tensor(reader, name, path)
        geometry = op.geometry
        if geometry.kind == geometry_lib.KIND_DENSE:
            value = value.reshape(value.shape[-2], value.shape[-1])
            geometry = dataclasses.replace(geometry, kernel_shape=tuple(value.shape))
        else:
            value = np.asarray(op.to_spectral(value))
        records.append(LayerRecord(name, value, geometry))
    return records
