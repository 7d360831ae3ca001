"""What every reader returns, and the error it raises: `LayerRecord`s in a `Checkpoint`."""

import dataclasses
import typing

import numpy as np

from tfconvnorm import geometry as geometry_lib
from tfconvnorm import layer_norms


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not match the architecture given.

    The message names the file and, for a mismatch, the first variable that
    does not match.
    """


def first_line(error):
    """The first line of an exception's message, for one-line errors that name a file."""
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


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


def records_from_operators(operators, values):
    """`LayerRecord`s from `LayerOperator`s and kernel values keyed by variable path."""
    kernels = layer_norms.spectral_kernels(
        operators, [np.asarray(values[op.variable.path]) for op in operators])
    return [LayerRecord(op.name, np.asarray(kernel), op.geometry)
            for op, kernel in zip(operators, kernels)]


def model_operators(model):
    # Each layer with its own zero padding: certified bounds, any stride.
    return geometry_lib.model_geometry(model)


def model_records(model):
    """The `LayerRecord`s of a built Keras model's current weights."""
    operators = model_operators(model)
    return records_from_operators(
        operators, {op.variable.path: op.variable.numpy() for op in operators})


def with_values(model, values):
    """A model built by a reader, given the checkpoint's values (`{variable path: value}`)."""
    for variable in model.weights:
        if variable.path in values:
            variable.assign(values[variable.path])
    return model
