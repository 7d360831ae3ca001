"""Independent oracles for the operators of Keras models, shared by the tests.

Everything here is built from `tfconvnorm.reference`'s explicit matrices
(tap by tap, no DFT, no embedding code of the library), given a
`LayerOperator`'s hand-checkable geometry: the layer part as the model
computes it (its own zero padding), and the circular operator on the
embedding size whose norm the library reports as the upper bound.
"""

import keras
import numpy as np

from tfconvnorm import reference


def _numpy(value):
    """A variable or tensor of any Keras backend as a NumPy array."""
    return keras.ops.convert_to_numpy(value)


def _kernel(op, kernel=None):
    value = _numpy(op.variable) if kernel is None else np.asarray(kernel)
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


def _float64_twin(layer_class, config, input_shape, weights):
    config = dict(config, dtype="float64", use_bias=False)
    config.pop("name", None)
    twin = layer_class.from_config(config)
    twin.build((None,) + tuple(input_shape))
    twin.set_weights([np.asarray(w, np.float64) for w in weights])
    return twin


def _matrix(layer, input_shape):
    return reference.function_matrix(
        lambda x: _numpy(layer(keras.ops.convert_to_tensor(x, "float64"))), input_shape)


def keras_part_matrices(layer, input_shape):
    """The Keras layer itself as the oracle: {kernel variable name: (float64
    matrix of that part, c_out, c_in, groups)}, from a float64 bias-free twin
    applied to every basis vector; a separable layer's parts are the depthwise
    and 1x1 layers it is made of."""
    config = layer.get_config()
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        rank = len(input_shape) - 1
        depthwise_class = keras.layers.DepthwiseConv1D if rank == 1 else keras.layers.DepthwiseConv2D
        keys = ("kernel_size", "strides", "padding", "dilation_rate", "depth_multiplier")
        depthwise = _float64_twin(depthwise_class, {k: config[k] for k in keys}, input_shape,
                                  [_numpy(layer.depthwise_kernel)])
        mid = depthwise.compute_output_shape((None,) + tuple(input_shape))[1:]
        pointwise_class = keras.layers.Conv1D if rank == 1 else keras.layers.Conv2D
        pointwise = _float64_twin(pointwise_class, dict(filters=config["filters"],
                                                         kernel_size=1), mid,
                                  [_numpy(layer.pointwise_kernel)])
        c_in, m = layer.depthwise_kernel.shape[-2:]
        return {"depthwise_kernel": (_matrix(depthwise, input_shape), c_in * m, c_in, c_in),
                "pointwise_kernel": (_matrix(pointwise, mid), config["filters"], c_in * m, 1)}
    # The kernel alone: the twin is bias-free (a bias is no part of the operator).
    twin = _float64_twin(type(layer), config, input_shape, [_numpy(layer.kernel)])
    c_in = input_shape[-1]
    if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        m = layer.kernel.shape[-1]
        return {"kernel": (_matrix(twin, input_shape), c_in * m, c_in, c_in)}
    c_out = twin.compute_output_shape((None,) + tuple(input_shape))[-1]
    groups = getattr(layer, "groups", 1)
    return {"kernel": (_matrix(twin, input_shape), c_out, c_in, groups)}
