"""Independent oracles for the operators of Keras models, shared by the tests.

Everything here is built from `tfconvnorm.reference`'s explicit matrices
(tap by tap, no DFT, no embedding code of the library), given a
`LayerOperator`'s hand-checkable geometry: the layer part as the model
computes it (its own zero padding), and the circular operator on the
embedding size whose norm the library reports as the upper bound.
"""

import numpy as np

from tfconvnorm import reference


def _kernel(op, kernel=None):
    value = op.variable.numpy() if kernel is None else np.asarray(kernel)
    return np.asarray(op.to_spectral(value.astype(np.float64)))


def layer_matrix(op, kernel=None):
    """Explicit matrix of the layer part `op` describes (its current kernel, or
    `kernel` in the variable's layout), zero padding included."""
    k = _kernel(op, kernel)
    g = op.geometry
    if g.kind == "dense":
        return k.T
    padding = g.layer_padding or g.padding
    if g.kind == "conv_transpose":  # the adjoint of the strided conv of its output size
        return reference.explicit_padded_operator_matrix(k, g.input_shape, g.strides,
                                                         g.dilation_rate, 1, padding).T
    return reference.explicit_padded_operator_matrix(k, g.input_shape, g.strides,
                                                     g.dilation_rate, g.groups, padding)


def true_norm(op, kernel=None):
    """The layer part's operator norm."""
    return float(np.linalg.norm(layer_matrix(op, kernel), 2))


def circular_matrix(op, kernel=None):
    """Explicit matrix of the circular operator whose spectrum the library
    computes for `op` (on the embedding size for a zero-padded layer)."""
    k = _kernel(op, kernel)
    g = op.geometry
    if g.kind == "dense":
        return k.T
    return reference.explicit_operator_matrix(k, g.embedding_shape, g.strides, g.dilation_rate,
                                              g.groups)


def circular_norm(op, kernel=None):
    """The norm the library reports as `op`'s upper bound."""
    return float(np.linalg.norm(circular_matrix(op, kernel), 2))


def bounding_spectrum(op, kernel=None):
    """What `conv_singular_values` must give for `op`: the circular operator's
    singular values block by block, cut to the layer part's own count."""
    g = op.geometry
    k = _kernel(op, kernel)
    groups = 1 if g.kind in ("dense", "conv_transpose") else g.groups
    c_out, c_in = k.shape[-1], k.shape[-2] * groups
    layer = reference.grouped_singular_values(layer_matrix(op, kernel), c_out, c_in, groups) \
        if g.kind != "conv_transpose" else np.linalg.svd(layer_matrix(op, kernel),
                                                         compute_uv=False)
    if g.kind == "dense":
        return layer, layer
    circular = reference.grouped_singular_values(circular_matrix(op, kernel), c_out, c_in,
                                                 groups)
    return circular[:len(layer)], layer
