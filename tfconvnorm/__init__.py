"""tfconvnorm: exact singular values of convolutional layers, and operator-norm projections.

The public API is re-exported here; see README.md for a tour. Importing the
package registers the Keras constraint and regularizer for `.keras` loading,
and does not import matplotlib, absl flags or TFDS. An unsupported TensorFlow
or Keras stops the import with one error naming the supported range.
"""

# TensorFlow's first import: the command-line tools start without its C++ logging.
from tfconvnorm import _startup

with _startup.quiet_tensorflow_import():
    from tfconvnorm import _compat

_compat.check_versions()

from tfconvnorm import reference  # noqa: E402  pylint: disable=wrong-import-position
from tfconvnorm.spectral import (
    CIRCULAR,
    PADDING_MODES,
    CircularEmbedding,
    circular_embedding,
    DEFAULT_METHOD,
    METHODS,
    clip_conv_singular_values,
    clip_conv_singular_values_batch,
    conv_operator_norm,
    conv_operator_norm_batch,
    conv_singular_values,
    conv_singular_values_batch,
    conv_transfer_matrices,
    conv_singular_values_many,
    conv_operator_norm_many,
    clip_conv_singular_values_many,
    conv_operator_norm_bounds,
    conv_operator_norm_bounds_many,
    conv_operator_norm_upper_bound,
    NormBounds,
    DEFAULT_POWER_ITERATIONS,
    apply_convolution,
)
from tfconvnorm.geometry import (
    ALL_KINDS,
    CONV_KINDS,
    ConvGeometry,
    LayerOperator,
    layer_geometry,
    model_geometry,
)
from tfconvnorm.constraints import OperatorNormConstraint, OperatorNormRegularizer, constrain
from tfconvnorm.batch_norm import PreciseBatchNorm, recalibrate_batch_norm
from tfconvnorm.callbacks import OperatorNormClipper, SpectrumLogger
from tfconvnorm.lipschitz import LipschitzBound, empirical_lower_bound, lipschitz_bound
from tfconvnorm.robustness import certified_accuracy, certified_radius
from tfconvnorm import checkpoints
from tfconvnorm import plotting
from tfconvnorm.checkpoints import CheckpointError, LayerSpectrum, detect_format, layer_spectra

__version__ = "0.1.0"

#: The public API (everything else is reached through its module).
__all__ = [
    "reference", "CIRCULAR", "PADDING_MODES", "CircularEmbedding", "circular_embedding",
    "DEFAULT_METHOD", "METHODS", "clip_conv_singular_values",
    "clip_conv_singular_values_batch", "conv_operator_norm", "conv_operator_norm_batch",
    "conv_singular_values", "conv_singular_values_batch", "conv_transfer_matrices",
    "conv_singular_values_many", "conv_operator_norm_many",
    "clip_conv_singular_values_many", "conv_operator_norm_bounds",
    "conv_operator_norm_bounds_many", "conv_operator_norm_upper_bound", "NormBounds",
    "DEFAULT_POWER_ITERATIONS", "apply_convolution", "ALL_KINDS", "CONV_KINDS",
    "ConvGeometry", "LayerOperator", "layer_geometry", "model_geometry",
    "OperatorNormConstraint", "OperatorNormRegularizer", "constrain",
    "OperatorNormClipper", "PreciseBatchNorm", "SpectrumLogger", "recalibrate_batch_norm",
    "LipschitzBound", "empirical_lower_bound", "lipschitz_bound", "certified_radius",
    "certified_accuracy", "checkpoints",
    "plotting", "CheckpointError", "LayerSpectrum", "detect_format", "layer_spectra",
]
