"""tfconvnorm: exact singular values of convolutional layers, and operator-norm projections.

The public API is re-exported here; see README.md for a tour.
"""

from tfconvnorm import reference
from tfconvnorm.spectral import (
    DEFAULT_METHOD,
    METHODS,
    clip_conv_singular_values,
    conv_operator_norm,
    conv_singular_values,
    conv_transfer_matrices,
)

__version__ = "0.1.0"
