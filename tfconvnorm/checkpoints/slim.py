"""TF-slim ResNet V2 checkpoints (name-based), read against the Keras ResNet V2 of
the same layout through a name map:

    conv1_conv/kernel                  <-> resnet_v2_50/conv1/weights
    conv{S}_block{K}_preact_bn/gamma   <-> resnet_v2_50/block{S-1}/unit_{K}/bottleneck_v2/preact/gamma
    conv{S}_block{K}_0_conv/kernel     <-> .../unit_{K}/bottleneck_v2/shortcut/weights
    conv{S}_block{K}_{1,2,3}_conv/...  <-> .../unit_{K}/bottleneck_v2/conv{1,2,3}/{weights,biases}
    conv{S}_block{K}_{1,2}_bn/beta     <-> .../unit_{K}/bottleneck_v2/conv{1,2}/BatchNorm/beta
    post_bn/...                        <-> resnet_v2_50/postnorm/...
    predictions/kernel                 <-> resnet_v2_50/logits/weights

Slim's logits are a 1x1 conv with 1001 classes (class 0 is "background");
Keras' are a Dense layer with 1000.
"""

import dataclasses
import os
import re

import keras
import numpy as np

from tfconvnorm import _compat
from tfconvnorm import geometry as geometry_lib
from tfconvnorm.checkpoints import architectures
from tfconvnorm.checkpoints.records import (Checkpoint, CheckpointError, LayerRecord,
                                            model_operators)
from tfconvnorm.checkpoints.tf_checkpoint import (TF2_GRAPH_KEY, checkpoint_shapes,
                                                  checkpoint_variables, get_tensor,
                                                  resolve_checkpoint_prefix)

FORMAT = "slim"
SLIM_SCOPE = re.compile(r"^(resnet_v2_\d+)/")
_KERAS_FIRST_STAGE = 2  # Keras stage conv2 is slim block1.
_BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
_CONV_TO_SLIM = {"kernel": "weights", "bias": "biases"}
_SLIM_TO_CONV = {v: k for k, v in _CONV_TO_SLIM.items()}
_UNIT_CONVS = {"0": "shortcut", "1": "conv1", "2": "conv2", "3": "conv3"}
_SLIM_UNIT_CONVS = {v: k for k, v in _UNIT_CONVS.items()}


def detect(path):
    """A TF checkpoint without a `.meta` graph or an object graph, whose variables
    are named `resnet_v2_N/...`."""
    prefix = resolve_checkpoint_prefix(path)
    if os.path.exists(prefix + ".meta"):
        return False
    _, shapes = checkpoint_shapes(prefix, path)
    return TF2_GRAPH_KEY not in shapes and any(SLIM_SCOPE.match(name) for name in shapes)


def read(path, family=None, depth=None, image_size=None):
    """The `Checkpoint` of a slim ResNet V2 checkpoint, against the ImageNet ResNet
    V2 of the depth given or of the checkpoint's one `resnet_v2_N` scope."""
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
    scope = slim_scope(depth)
    model, description = architectures.build_imagenet(
        depth, image_size, include_top=f"{scope}/logits/weights" in variables)
    records = read_slim_resnet_v2(path, model, lambda name: keras_to_slim(name, depth))
    return Checkpoint(path, FORMAT, records, description + " (slim names)", None,
                      "slim checkpoints hold a 1001-class classifier the rebuilt model lacks")


def slim_scope(depth_or_name):
    """The slim variable scope, e.g. "resnet_v2_50"."""
    return f"resnet_v2_{_resnet_v2().parse_depth(depth_or_name)}"


def _check_block(depth, stage, block, name):
    blocks = _resnet_v2().STAGE_BLOCKS[depth]
    index = stage - _KERAS_FIRST_STAGE
    if not (0 <= index < len(blocks) and 1 <= block <= blocks[index]):
        raise ValueError(f"{name!r} has no counterpart in ResNet{depth}V2 "
                         f"(stages conv2..conv5 with {blocks} blocks)")


def keras_to_slim(layer_name, depth):
    """Maps a Keras ResNet V2 name to its TF-slim name.

    Args:
      layer_name: a variable path (`"conv2_block1_1_conv/kernel"`: returns the
        slim variable name) or a layer name (`"conv2_block1_1_conv"`: returns
        the slim scope of that layer, e.g. `.../unit_1/bottleneck_v2/conv1`).
      depth: 50/101/152 or a name `parse_depth` accepts.

    Raises:
      ValueError: a name that is not a weight layer / variable of that model.
    """
    depth = _resnet_v2().parse_depth(depth)
    scope = f"resnet_v2_{depth}"
    layer, _, variable = str(layer_name).partition("/")

    def fail():
        return ValueError(f"layer_name {layer_name!r} is not a weight layer or variable "
                          f"of keras.applications.ResNet{depth}V2")

    if layer == "conv1_conv":
        layer_scope, kind = f"{scope}/conv1", "conv"
    elif layer == "post_bn":
        layer_scope, kind = f"{scope}/postnorm", "bn"
    elif layer == "predictions":
        layer_scope, kind = f"{scope}/logits", "conv"
    else:
        match = re.match(r"^conv(\d)_block(\d+)_(preact_bn|[0-3]_conv|[12]_bn)$", layer)
        if not match:
            raise fail()
        stage, block, part = int(match.group(1)), int(match.group(2)), match.group(3)
        _check_block(depth, stage, block, layer_name)
        unit = f"{scope}/block{stage - 1}/unit_{block}/bottleneck_v2"
        if part == "preact_bn":
            layer_scope, kind = f"{unit}/preact", "bn"
        elif part.endswith("_conv"):
            layer_scope, kind = f"{unit}/{_UNIT_CONVS[part[0]]}", "conv"
        else:
            layer_scope, kind = f"{unit}/conv{part[0]}/BatchNorm", "bn"
    if not variable:
        return layer_scope
    if kind == "bn" and variable in _BN_VARIABLES:
        return f"{layer_scope}/{variable}"
    if kind == "conv" and variable in _CONV_TO_SLIM:
        return f"{layer_scope}/{_CONV_TO_SLIM[variable]}"
    raise fail()


def slim_to_keras(var_name):
    """Maps a TF-slim ResNet V2 variable name to the Keras variable path.

    Raises:
      ValueError: a name with no Keras counterpart (`global_step`, optimizer
        slots, or not a ResNet V2 weight).
    """
    def fail():
        return ValueError(f"var_name {var_name!r} is not a TF-slim resnet_v2_{{50,101,152}} "
                          "weight with a Keras counterpart")

    match = re.match(r"^resnet_v2_(\d+)/(.+)$", str(var_name))
    if not match or int(match.group(1)) not in _resnet_v2().STAGE_BLOCKS:
        raise fail()
    depth, rest = int(match.group(1)), match.group(2)
    simple = {"conv1": "conv1_conv", "logits": "predictions", "postnorm": "post_bn"}
    head, _, variable = rest.rpartition("/")
    if head in ("conv1", "logits") and variable in _SLIM_TO_CONV:
        return f"{simple[head]}/{_SLIM_TO_CONV[variable]}"
    if head == "postnorm" and variable in _BN_VARIABLES:
        return f"post_bn/{variable}"
    match = re.match(r"^block(\d)/unit_(\d+)/bottleneck_v2/(preact|shortcut|conv[123])"
                     r"(/BatchNorm)?$", head)
    if not match:
        raise fail()
    stage, block = int(match.group(1)) + 1, int(match.group(2))
    part, batch_norm = match.group(3), bool(match.group(4))
    try:
        _check_block(depth, stage, block, var_name)
    except ValueError:
        raise fail() from None
    prefix = f"conv{stage}_block{block}"
    if part == "preact" and not batch_norm and variable in _BN_VARIABLES:
        return f"{prefix}_preact_bn/{variable}"
    if part in ("conv1", "conv2") and batch_norm and variable in _BN_VARIABLES:
        return f"{prefix}_{part[-1]}_bn/{variable}"
    if part != "preact" and not batch_norm and variable in _SLIM_TO_CONV:
        return f"{prefix}_{_SLIM_UNIT_CONVS[part]}_conv/{_SLIM_TO_CONV[variable]}"
    raise fail()


def slim_value_to_keras(var_name, value):
    """Converts a slim variable's value to the layout of its Keras variable.

    Only the logits differ: slim's `(1, 1, 2048, 1001)` 1x1 conv (class 0 is
    "background") becomes Keras' `(2048, 1000)` Dense kernel.
    """
    if str(var_name).endswith("/logits/weights"):
        return value.reshape(value.shape[-2], value.shape[-1])[:, 1:]
    if str(var_name).endswith("/logits/biases"):
        return value[1:]
    return value




def _resnet_v2():
    """`tfconvnorm.models.imagenet_resnet_v2`, imported on first use: `import
    tfconvnorm` does not import the models."""
    from tfconvnorm.models import imagenet_resnet_v2  # pylint: disable=import-outside-toplevel
    return imagenet_resnet_v2


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
