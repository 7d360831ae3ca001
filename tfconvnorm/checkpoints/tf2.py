"""TF2 object-based checkpoints of `tf.train.Checkpoint(model=model)` (as train writes)."""

import collections
import os

import tensorflow as tf

from tfconvnorm.checkpoints import architectures
from tfconvnorm.checkpoints.records import (Checkpoint, CheckpointError, model_operators,
                                            records_from_operators, with_values)
from tfconvnorm.checkpoints.tf_checkpoint import (TF2_GRAPH_KEY, checkpoint_shapes, get_tensor,
                                                  resolve_checkpoint_prefix)

FORMAT = "tf2"


_TF2_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_TF2_SLOT_MARKER = "/.OPTIMIZER_SLOT/"


def detect(path):
    """A TF checkpoint without a `.meta` graph that holds an object graph."""
    prefix = resolve_checkpoint_prefix(path)
    if os.path.exists(prefix + ".meta"):
        return False
    _, shapes = checkpoint_shapes(prefix, path)
    return TF2_GRAPH_KEY in shapes


def read(path, family=None, depth=None, image_size=None):
    """The `Checkpoint` of a TF2 checkpoint, against the architecture given
    (`family`, `depth`) or the one of the run's config.json."""
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
    return Checkpoint(path, FORMAT, records, description, with_values(model, values))


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
    return records_from_operators(model_operators(model),
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
    reader, shapes = checkpoint_shapes(prefix, path)
    if TF2_GRAPH_KEY not in shapes:
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
    return {variable.path: get_tensor(reader, keys[variable.path], path)
            for variable in model.weights}
