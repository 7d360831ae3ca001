"""A certified upper bound on the l2 Lipschitz constant of a whole Keras model.

`lipschitz_bound(model)` propagates, over the model's functional graph
(nested models included), a bound L(t) for every tensor t: the Lipschitz
constant of the map from the model's input to t, in inference mode. Each
rule is an upper bound with a reason:

* a layer f applied to t: L(f(t)) <= Lip(f) L(t). Linear layers get their
  certified upper bound for their real padding (`tfconvnorm.spectral`);
  a BatchNormalization that directly follows a conv or Dense layer (with no
  activation, and nothing else reading its output) is folded into the
  kernel first, which gives a tighter bound that is still certified;
* Add: L(a + b) <= L(a) + L(b); Subtract likewise; Average: the mean;
  Concatenate and Maximum / Minimum: sqrt(L(a)^2 + L(b)^2);
* activations, pooling and shape-only layers: the constants in
  `ACTIVATION_CONSTANTS` and the functions below, each derived in a comment.

Anything else (a product of two tensors, attention, LayerNormalization,
custom layers) raises a ValueError naming the layer, unless its constant is
given in `layer_bounds={name: value}`: the layer is then taken to be
value-Lipschitz in its (concatenated) inputs.

Several model inputs count as one concatenated input; several outputs as
one concatenated output.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from tfconvnorm import _compat
from tfconvnorm import geometry as geometry_lib
from tfconvnorm import spectral
from tfconvnorm.spectral import padding as padding_lib
from tfconvnorm.spectral.arguments import check_positive

# sup |f'| of each activation (the l2 Lipschitz constant of an elementwise
# function is that of its scalar function). Smooth ones whose maximum has no
# closed form: the maximum of f' on a grid of step h = 1e-5 over [-20, 20]
# (f' flattens outside) plus h * sup|f''|, rounded up; tests check each
# constant against Keras' own function on a finer grid.
ACTIVATION_CONSTANTS = {
    "linear": 1.0,
    "relu": 1.0,                 # slopes 0 and 1
    "relu6": 1.0,
    "tanh": 1.0,                 # 1 - tanh^2 <= 1, at 0
    "sigmoid": 0.25,             # s (1 - s) <= 1/4, at 0
    "softplus": 1.0,             # derivative: the sigmoid, < 1
    "softsign": 1.0,             # 1 / (1 + |x|)^2 <= 1
    "elu": 1.0,                  # alpha = 1: slopes e^x < 1 and 1
    "celu": 1.0,                 # e^(x / alpha) <= 1 and 1
    "selu": 1.0507009873554805 * 1.6732632423543772,   # scale * alpha e^x <= scale * alpha
    "gelu": 1.1290,              # exact: Phi(sqrt2) + sqrt2 phi(sqrt2) = 1.128904; the
                                 # tanh form: grid max 1.128993 + 1e-5 * 0.8
    "silu": 1.0999,              # sigma (1 + x (1 - sigma)): grid max 1.099839 at 2.3994
                                 # + 1e-5 * 0.5
    "swish": 1.0999,
    "mish": 1.0886,              # grid max 1.088498 + 1e-5 * 1
    "hard_sigmoid": 1.0 / 6.0,   # relu6(x + 3) / 6
    "hard_silu": 1.5,            # x relu6(x + 3) / 6: slope (2x + 3) / 6 on [-3, 3], <= 3/2
    "hard_swish": 1.5,
    "hard_tanh": 1.0,
    "log_sigmoid": 1.0,          # derivative sigmoid(-x) < 1
    "tanh_shrink": 1.0,          # x - tanh x: slope tanh^2 < 1
    "soft_shrink": 1.0,          # slopes 0 and 1
    "squareplus": 1.0,           # (1 + x / sqrt(x^2 + b)) / 2 <= 1
    "sparse_plus": 1.0,          # slopes 0, (x + 1) / 2 <= 1, 1
    "sparse_sigmoid": 0.5,       # slopes 0, 1/2, 0
    "sparsemax": 1.0,            # a Euclidean projection onto the simplex: nonexpansive
    # softmax: its Jacobian diag(p) - p p^T is positive semi-definite, and by
    # Gershgorin each eigenvalue is <= p_i (1 - p_i) + p_i (1 - p_i) <= 1/2
    # (attained at two classes with p = 1/2); per position along its axis the
    # Jacobian is block diagonal.
    "softmax": 0.5,
}


@dataclasses.dataclass(frozen=True)
class LayerFactor:
    """One call of one layer in the propagation.

    Attributes:
      name: the layer's name (nested models: "outer/inner").
      class_name: the layer's (or operation's) class.
      factor: its own Lipschitz factor (for a merge of several inputs: None;
        `reason` says the rule).
      bound: the running bound of its output, L(output).
      reason: why `factor` holds.
    """

    name: str
    class_name: str
    factor: float
    bound: float
    reason: str


@dataclasses.dataclass(frozen=True)
class LipschitzBound:
    """A certified upper bound on the model's l2 Lipschitz constant in inference.

    `float(result)` is the bound; `layers` the per-call breakdown, in the
    order of propagation.
    """

    value: float
    layers: tuple

    def __float__(self):
        return float(self.value)

    def top_contributors(self, count=5):
        """The `count` largest single-input factors (the layers that dominate)."""
        single = [f for f in self.layers if f.factor is not None]
        return sorted(single, key=lambda f: f.factor, reverse=True)[:count]

    def summary(self, count=5):
        """The bound and its top contributors, as text."""
        lines = [f"certified l2 Lipschitz upper bound: {self.value:.6g}",
                 f"largest factors (of {len(self.layers)} layer calls):"]
        for f in self.top_contributors(count):
            lines.append(f"  {f.factor:>10.4g}  {f.name} ({f.class_name}): {f.reason}")
        return "\n".join(lines)


class _Unsupported(ValueError):
    pass


def _activation_constant(activation, where):
    """Lipschitz constant of an activation given as a Keras function or name."""
    name = activation if isinstance(activation, str) else None
    if name is None:
        try:
            name = keras.activations.serialize(activation)
        except Exception:  # pylint: disable=broad-except
            name = None
        if isinstance(name, dict):
            name = name.get("config") if isinstance(name.get("config"), str) else None
    if name in ACTIVATION_CONSTANTS:
        return ACTIVATION_CONSTANTS[name], f"{name} activation"
    raise _Unsupported(f"{where}: activation {name or activation!r} has no known Lipschitz "
                       "constant")


def _data_format(layer):
    return getattr(layer, "data_format", "channels_last")


def _spatial(layer, shape):
    shape = tuple(shape)
    return shape[2:] if _data_format(layer) == "channels_first" else shape[1:-1]


def _average_pool_matrix(n, pool, stride, padding):
    """The 1-D average pooling matrix as TensorFlow computes it: 'same' pads,
    and the padded positions are left out of each average (not zeros)."""
    embedding = padding_lib.circular_embedding((pool,), (n,), stride, 1, padding)
    (before, _), = embedding.pads
    (out,) = embedding.output_shape
    matrix = np.zeros((out, n))
    for o in range(out):
        window = [j for j in range(o * stride - before, o * stride - before + pool)
                  if 0 <= j < n]
        matrix[o, window] = 1.0 / len(window)
    return matrix


def _max_pool_multiplicity(n, pool, stride, padding):
    """The largest number of 1-D windows that share an input position."""
    embedding = padding_lib.circular_embedding((pool,), (n,), stride, 1, padding)
    (before, _), = embedding.pads
    (out,) = embedding.output_shape
    counts = np.zeros(n, np.int64)
    for o in range(out):
        for j in range(o * stride - before, o * stride - before + pool):
            if 0 <= j < n:
                counts[j] += 1
    return int(counts.max())


def _pool_arguments(layer, shape):
    spatial = _spatial(layer, shape)
    rank = len(spatial)
    pool = tuple(layer.pool_size) if not isinstance(layer.pool_size, int) else \
        (layer.pool_size,) * rank
    strides = layer.strides if layer.strides is not None else pool
    strides = tuple(strides) if not isinstance(strides, int) else (strides,) * rank
    if any(d is None for d in spatial):
        raise _Unsupported(f"layer '{layer.name}': its spatial input size is unknown; pass "
                           "input_shape=")
    return spatial, pool, strides, layer.padding


def _average_pooling(layer, shape):
    # Linear and separable over axes (the window is a box, the count of valid
    # entries a product): the operator is the Kronecker product of per-axis
    # matrices (per channel), so its norm is the product of theirs, exactly.
    spatial, pool, strides, padding = _pool_arguments(layer, shape)
    factor = 1.0
    for n, p, s in zip(spatial, pool, strides):
        factor *= float(np.linalg.norm(_average_pool_matrix(n, p, s, padding), 2))
    return factor, "average pooling: exact norm (product of the per-axis averaging matrices)"


def _max_pooling(layer, shape):
    # |max_S x - max_S y| <= ||(x - y)_S||_2 for each window S; summing the
    # squares over windows counts each position as often as windows share it.
    spatial, pool, strides, padding = _pool_arguments(layer, shape)
    shared = 1
    for n, p, s in zip(spatial, pool, strides):
        shared *= _max_pool_multiplicity(n, p, s, padding)
    return math.sqrt(shared), f"max pooling: sqrt of {shared} windows sharing a position"


def _global_average(layer, shape):
    # Per channel x -> mean(x) = (1/P) 1^T x: norm sqrt(P) / P.
    spatial = _spatial(layer, shape)
    if any(d is None for d in spatial):
        raise _Unsupported(f"layer '{layer.name}': its spatial input size is unknown; pass "
                           "input_shape=")
    positions = int(np.prod(spatial))
    return 1.0 / math.sqrt(positions), f"global average of {positions} positions: 1/sqrt(P)"


def _batch_norm_scale(layer):
    """Per-channel inference scale |gamma| / sqrt(moving_variance + epsilon)."""
    variance = np.asarray(layer.moving_variance.numpy(), np.float64)
    scale = 1.0 / np.sqrt(variance + layer.epsilon)
    if layer.scale:
        scale = scale * np.abs(np.asarray(layer.gamma.numpy(), np.float64))
    return scale


def _relu_constant(layer):
    if float(layer.threshold or 0.0) != 0.0:
        raise _Unsupported(f"layer '{layer.name}': ReLU with threshold "
                           f"{layer.threshold} is discontinuous")
    return max(1.0, abs(float(layer.negative_slope or 0.0))), "ReLU: slopes 1 and negative_slope"


def _single_input_factor(layer, shape):
    """(factor, reason) of a one-input layer that is not a linear operator layer."""
    L = keras.layers
    if isinstance(layer, (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D,
                          L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout,
                          L.AlphaDropout, L.ActivityRegularization, L.Identity, L.Masking)):
        return 1.0, "the identity in inference"
    if isinstance(layer, (L.Flatten, L.Reshape, L.Permute)):
        return 1.0, "a permutation of the entries"
    if isinstance(layer, (L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D,
                          L.Cropping1D, L.Cropping2D, L.Cropping3D)):
        return 1.0, "zero padding / cropping: an isometry / a restriction"
    if isinstance(layer, L.RepeatVector):
        return math.sqrt(layer.n), f"each entry repeated {layer.n} times"
    if isinstance(layer, (L.UpSampling1D, L.UpSampling2D, L.UpSampling3D)):
        if getattr(layer, "interpolation", "nearest") != "nearest":
            raise _Unsupported(f"layer '{layer.name}': {layer.interpolation} up-sampling")
        size = layer.size if isinstance(layer.size, (tuple, list)) else (layer.size,)
        copies = int(np.prod(size))
        return math.sqrt(copies), f"nearest up-sampling: each entry copied {copies} times"
    if isinstance(layer, L.Rescaling):
        return float(np.max(np.abs(np.asarray(layer.scale, np.float64)))), "Rescaling: |scale|"
    if isinstance(layer, L.Normalization):
        std = np.maximum(np.sqrt(np.asarray(layer.variance, np.float64)),
                         keras.backend.epsilon())
        if layer.invert:
            return float(np.max(std)), "inverted Normalization: max std"
        return float(np.max(1.0 / std)), "Normalization: 1 / min std"
    if isinstance(layer, L.BatchNormalization):
        return float(np.max(_batch_norm_scale(layer))), \
            "BatchNormalization in inference: max |gamma| / sqrt(moving_variance + eps)"
    if isinstance(layer, L.ReLU):
        return _relu_constant(layer)
    if isinstance(layer, L.LeakyReLU):
        return max(1.0, abs(float(layer.negative_slope))), "LeakyReLU: slopes 1 and alpha"
    if isinstance(layer, L.ELU):
        return max(1.0, abs(float(layer.alpha))), "ELU: slopes 1 and alpha e^x"
    if isinstance(layer, L.PReLU):
        alpha = float(np.max(np.abs(layer.alpha.numpy())))
        return max(1.0, alpha), "PReLU: slopes 1 and its largest |alpha|"
    if isinstance(layer, L.Softmax):
        return ACTIVATION_CONSTANTS["softmax"], "softmax: Jacobian norm <= 1/2"
    if isinstance(layer, L.Activation):
        return _activation_constant(layer.activation, f"layer '{layer.name}'")
    if isinstance(layer, (L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D)):
        return _average_pooling(layer, shape)
    if isinstance(layer, (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)):
        return _max_pooling(layer, shape)
    if isinstance(layer, (L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
                          L.GlobalAveragePooling3D)):
        return _global_average(layer, shape)
    if isinstance(layer, (L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D)):
        return 1.0, "global max: 1-Lipschitz per channel"
    from tfconvnorm.models.lipschitz_nets import MaxMin  # pylint: disable=import-outside-toplevel
    if isinstance(layer, MaxMin):
        return 1.0, "MaxMin: sorts pairs of channels, a permutation per pair"
    return None


_SUM_MERGES = (keras.layers.Add, keras.layers.Subtract)
_SQUARE_MERGES = (keras.layers.Concatenate, keras.layers.Maximum, keras.layers.Minimum)
# Keras ops used directly in a functional graph, by operation class name.
_OP_SUMS = ("Add", "Subtract")
_OP_IDENTITIES = ("Reshape", "Transpose", "Flatten", "ExpandDims", "Squeeze")
# ... and restrictions (a subset of the entries): 1-Lipschitz.
_OP_RESTRICTIONS = ("GetItem", "Slice", "StridedSlice")


def _folded_kernel(op, scale):
    """The operator's kernel (conv layout) with a BN scale folded into its
    output channels."""
    value = np.asarray(op.variable.numpy(), np.float64)
    return np.asarray(op.to_spectral(geometry_lib.KINDS[op.geometry.kind].fold_scale(value,
                                                                                   scale)))


def _foldable(source, bn):
    """Can `bn`, which reads only the output of graph node `source`, be folded
    into the last kernel of `source`'s layer? (A linear layer with no
    activation, and `bn` normalising its channel axis.)"""
    layer = source.operation
    if not isinstance(layer, geometry_lib.OPERATOR_LAYER_CLASSES):
        return False
    activation = getattr(layer, "activation", None)
    if activation is not None and _activation_name(activation) != "linear":
        return False
    axes = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    rank = len(source.outputs[0].shape)
    channel = 1 if _data_format(layer) == "channels_first" else rank - 1
    return len(axes) == 1 and axes[0] % rank == channel


def _activation_name(activation):
    try:
        name = keras.activations.serialize(activation)
    except Exception:  # pylint: disable=broad-except
        return None
    return name if isinstance(name, str) else None


class _Propagation:
    """State of one `lipschitz_bound` call."""

    def __init__(self, model, operators, layer_bounds):
        self.operators = {}
        for op in operators:
            self.operators.setdefault(id(op.layer), []).append(op)
        self.layer_bounds = dict(layer_bounds or {})
        self.records = []
        self.requests = {}   # key -> (kernel, geometry): certified upper bounds, pooled
        self.model = model

    def upper(self, kernel, op, key):
        self.requests.setdefault(key, (kernel, op.geometry))
        return key

    def linear_factor(self, layer, bn=None):
        """(deferred factor keys, reason): the product of the layer's parts."""
        ops = self.operators.get(id(layer))
        if not ops:
            raise _Unsupported(f"layer '{layer.name}': its geometry is unknown")
        keys = []
        for index, op in enumerate(ops):
            if bn is not None and index == len(ops) - 1:
                kernel = _folded_kernel(op, _batch_norm_scale(bn))
                keys.append(self.upper(kernel, op, (op.name, bn.name)))
            else:
                keys.append(self.upper(op.to_spectral(op.variable.numpy()), op, (op.name,)))
        parts = " x ".join(op.geometry.kind for op in ops)
        reason = f"certified upper bound ({parts}, padding {ops[0].geometry.padding})"
        if bn is not None:
            reason += f", BatchNormalization '{bn.name}' folded in"
        return keys, reason


def _consumers(functional):
    """{id(tensor): number of graph nodes reading it}."""
    counts = {}
    for nodes in _compat.nodes_by_depth(functional).values():
        for node in nodes:
            for tensor in node.input_tensors:
                counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    for tensor in functional.outputs:
        counts[id(tensor)] = counts.get(id(tensor), 0) + 1
    return counts


def _propagate(state, functional, input_bounds, prefix):
    """Bounds of `functional`'s outputs from its inputs' bounds.

    Every bound is deferred: a function of the linear layers' norms, which
    are computed afterwards in one pooled call (`state.requests`).
    """
    producers = {}
    for nodes in _compat.nodes_by_depth(functional).values():
        for node in nodes:
            for tensor in node.outputs:
                producers[id(tensor)] = node
    consumers = _consumers(functional)
    folded = {}   # id(bn node) -> linear layer folded into it
    for nodes in _compat.nodes_by_depth(functional).values():
        for node in nodes:
            op = node.operation
            if isinstance(op, keras.layers.BatchNormalization) and len(node.input_tensors) == 1:
                source = producers.get(id(node.input_tensors[0]))
                if (source is not None and not source.is_input
                        and consumers.get(id(node.input_tensors[0])) == 1
                        and _foldable(source, op)):
                    folded[id(source)] = op
                    folded[id(node)] = source.operation

    def step(node, inputs, _):
        op = node.operation
        name = f"{prefix}{op.name}"
        inner = geometry_lib.functional_of(op)
        if inner is not None:
            return _propagate(state, inner, inputs, f"{name}/")
        return [_node_bound(state, node, op, inputs, name, folded)] * len(node.outputs)

    return geometry_lib.walk_graph(functional, input_bounds, step)


def _is_tf_op(op, names):
    """A call of a raw TensorFlow / keras.ops function (not a Layer) named in `names`."""
    return type(op).__name__ in names and not isinstance(op, keras.layers.Layer)


def _linear_rule(state, node, op, name, folded):
    bn = folded.get(id(node))
    keys, reason = state.linear_factor(op, bn)
    activation, act_reason = 1.0, ""
    if getattr(op, "activation", None) is not None:
        activation, act_reason = _activation_constant(op.activation, f"layer '{name}'")
        if activation != 1.0 or act_reason != "linear activation":
            reason += f", then {act_reason} ({activation:g})"
    return _SCALE, lambda norms: math.prod(norms[k] for k in keys) * activation, reason


def _merge_rule(combine, reason):
    return lambda state, node, op, name, folded: (combine, None, reason)


def _scale_rule(reason):
    return lambda state, node, op, name, folded: (_SCALE, 1.0, reason)


# How a call's bound follows from its inputs' bounds v and its factor f.
_SCALE = "scale"
_COMBINE = {
    _SCALE: lambda f, v: f * v[0],
    "sum": lambda f, v: sum(v),
    "mean": lambda f, v: sum(v) / len(v),
    "norm": lambda f, v: math.sqrt(sum(x * x for x in v)),
    "scaled_norm": lambda f, v: f * math.sqrt(sum(x * x for x in v)),
}

#: (applies(op, node, folded), rule(state, node, op, name, folded) -> (combine,
#: factor, reason)): the first entry that applies gives a call's rule; layers
#: none of them names go to `_single_input_factor` (activations, pooling,
#: reshapes, ...), and a layer with no rule at all is refused by name.
_NODE_RULES = (
    (lambda op, node, folded: isinstance(op, geometry_lib.OPERATOR_LAYER_CLASSES),
     _linear_rule),
    (lambda op, node, folded: (isinstance(op, keras.layers.BatchNormalization)
                               and id(node) in folded),
     lambda state, node, op, name, folded: (
         _SCALE, 1.0, f"folded into '{folded[id(node)].name}'")),
    (lambda op, node, folded: isinstance(op, _SUM_MERGES) or _is_tf_op(op, _OP_SUMS),
     _merge_rule("sum", "sum of the inputs' bounds")),
    (lambda op, node, folded: isinstance(op, keras.layers.Average),
     _merge_rule("mean", "mean of the inputs' bounds")),
    (lambda op, node, folded: isinstance(op, keras.layers.Concatenate),
     _merge_rule("norm", "sqrt of the sum of squares (concatenation)")),
    (lambda op, node, folded: isinstance(op, _SQUARE_MERGES),
     _merge_rule("norm", "elementwise max/min: 1-Lipschitz in each input, sqrt of the sum "
                         "of squares")),
    (lambda op, node, folded: _is_tf_op(op, _OP_IDENTITIES),
     _scale_rule("a permutation of the entries")),
    (lambda op, node, folded: _is_tf_op(op, _OP_RESTRICTIONS),
     _scale_rule("a restriction to some entries")),
)


def _node_rule(state, node, op, name, folded):
    """`(combine, factor, reason)` of a call: from `layer_bounds`, `_NODE_RULES` or
    `_single_input_factor`; raises `_Unsupported` naming a layer without one."""
    class_name = type(op).__name__
    user = state.layer_bounds.get(op.name)
    if user is not None:
        value = float(user)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"layer_bounds[{op.name!r}] must be a finite number >= 0; "
                             f"received {user!r}.")
        return "scaled_norm", value, "given in layer_bounds"
    for applies, rule in _NODE_RULES:
        if applies(op, node, folded):
            return rule(state, node, op, name, folded)
    shape = tuple(node.input_tensors[0].shape) if node.input_tensors else ()
    found = _single_input_factor(op, shape) if isinstance(op, keras.layers.Layer) else None
    if found is not None:
        return (_SCALE,) + tuple(found)
    raise _Unsupported(
        f"layer '{name}' ({class_name}) has no certified Lipschitz rule"
        + (" (a product of two tensors is not Lipschitz)"
           if isinstance(op, keras.layers.Multiply) or class_name == "Multiply" else ""))


def _node_bound(state, node, op, inputs, name, folded):
    """The deferred bound of a call's output: its rule applied to its inputs' bounds."""
    combine, factor, reason = _node_rule(state, node, op, name, folded)
    if combine == _SCALE and len(inputs) != 1:
        raise _Unsupported(f"layer '{name}' ({type(op).__name__}) has {len(inputs)} inputs")
    record = len(state.records)
    state.records.append(None)

    def evaluate(norms):
        values = [b(norms) for b in inputs]
        f = factor(norms) if callable(factor) else factor
        out = _COMBINE[combine](f, values)
        state.records[record] = LayerFactor(name, type(op).__name__,
                                            None if f is None else float(f), float(out),
                                            reason)
        return out

    return _memo(evaluate)


def _memo(evaluate):
    cache = {}

    def once(norms):
        if "value" not in cache:
            cache["value"] = evaluate(norms)
        return cache["value"]
    return once


def lipschitz_bound(model, input_shape=None, layer_bounds=None):
    """A certified upper bound on the l2 Lipschitz constant of `model` in inference.

    Args:
      model: a built functional or Sequential `keras.Model` (nested models
        included).
      input_shape: the input shape without the batch axis, where the model
        declares `None` spatial sizes (as for `tfconvnorm.model_geometry`).
      layer_bounds: `{layer name: constant}` for layers without a rule here
        (e.g. the Multiply of a squeeze-excitation block): each such layer is
        taken to be that-Lipschitz in its concatenated inputs. The constant
        is the caller's claim; the result is certified only if it holds.

    Returns:
      A `LipschitzBound`: `float(result)` is the bound; `.layers` the
      per-call factors and running bounds; `.top_contributors()` the layers
      that dominate.

    Raises:
      ValueError: a layer without a rule (named, with its class), or a model
        whose graph cannot be read (subclassed models).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model; received {type(model).__name__}.")
    functional = geometry_lib.functional_of(model)
    if functional is None:
        raise ValueError(f"model '{model.name}' is subclassed: its graph cannot be read, so no "
                         "Lipschitz bound can be propagated. Use a functional or Sequential "
                         "model.")
    unknown = sorted(set(layer_bounds or {}) - {
        layer.name for layer in _compat.flatten_layers(model)})
    if unknown:
        raise ValueError(f"`layer_bounds` names layers not in model '{model.name}': {unknown}.")
    operators = geometry_lib.model_geometry(model, input_shape=input_shape)
    state = _Propagation(model, operators, layer_bounds)
    ones = [_memo(lambda norms: 1.0) for _ in functional.inputs]
    try:
        outputs = _propagate(state, functional, ones, "")
    except _Unsupported as error:
        raise ValueError(f"{error}. Give its Lipschitz constant with "
                         "layer_bounds={'<layer name>': value} if you know one.") from None
    keys = list(state.requests)
    norms = {}
    if keys:
        pairs = spectral.conv_operator_norm_bounds_many(
            [tf.cast(state.requests[k][0], tf.float64) for k in keys],
            [state.requests[k][1] for k in keys], iterations=0)
        norms = {k: float(p.upper) for k, p in zip(keys, pairs)}
    values = [b(norms) for b in outputs]
    value = math.sqrt(sum(v * v for v in values))
    return LipschitzBound(value, tuple(r for r in state.records if r is not None))


def empirical_lower_bound(model, inputs, pairs_steps=50, jacobian_iterations=50, step_size=0.1,
                          seed=0, free_pairs_steps=None, free_pair_distance=1.0):
    """The largest ||f(x) - f(y)|| / ||x - y|| and Jacobian norm found, a lower
    estimate of the model's Lipschitz constant (for checking `lipschitz_bound`).

    From each input x of `inputs` (a batch): power iteration on the Jacobian
    at x (its norm is the local Lipschitz constant); gradient ascent on the
    ratio over pairs (x, x + delta) in delta; and "free" pairs (x + a,
    x + a + delta) started `free_pair_distance` apart, ascended in both a and
    delta. The Lipschitz constant is a supremum over all inputs, and a
    piecewise-linear network's Jacobian is constant within each region, so
    its gradient cannot lead x anywhere: a pair that spans regions can
    move. Inference mode.

    Args:
      pairs_steps, jacobian_iterations, free_pairs_steps: iterations of each
        search (0 skips a pairs search); free_pairs_steps defaults to
        pairs_steps.
      step_size: each ascent step's length relative to the pair's distance.
      free_pair_distance: the l2 distance the free pairs start at.

    Returns:
      The largest value found (a float).
    """
    if free_pairs_steps is None:
        free_pairs_steps = pairs_steps
    for name, value in (("pairs_steps", pairs_steps), ("jacobian_iterations", jacobian_iterations),
                        ("free_pairs_steps", free_pairs_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0; received {name}={value!r}.")
    free_pair_distance = check_positive(free_pair_distance, "free_pair_distance")
    step_size = check_positive(step_size, "step_size")
    x = tf.convert_to_tensor(inputs, tf.float32)
    generator = tf.random.Generator.from_seed(seed)

    def f(z):
        out = model(z, training=False)
        out = tf.concat([tf.reshape(o, (tf.shape(z)[0], -1)) for o in tf.nest.flatten(out)], 1)
        return tf.cast(out, tf.float32)

    best = 0.0
    # Jacobian power iteration: v <- J^T J v, by forward-over-reverse products.
    v = generator.normal(tf.shape(x))
    for _ in range(jacobian_iterations):
        with tf.autodiff.ForwardAccumulator(x, v) as accumulator:
            y = f(x)
        jv = accumulator.jvp(y)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = f(x)
        jtjv = tape.gradient(y, x, output_gradients=jv)
        norms = tf.sqrt(tf.reduce_sum(tf.square(tf.reshape(jtjv, (tf.shape(x)[0], -1))), 1))
        v = jtjv / tf.reshape(tf.maximum(norms, 1e-30), (-1,) + (1,) * (len(x.shape) - 1))
    with tf.autodiff.ForwardAccumulator(x, v) as accumulator:
        y = f(x)
    local = tf.norm(accumulator.jvp(y), axis=1)
    best = max(best, float(tf.reduce_max(local)))
    # Pairs at the data, then free pairs (see the docstring).
    best = max(best, _ascend_pairs(f, x, 1e-2 * generator.normal(tf.shape(x)), pairs_steps,
                                   step_size, move_start=False))
    delta = generator.normal(tf.shape(x))
    delta = delta * tf.reshape(free_pair_distance / tf.maximum(_per_example_norms(delta), 1e-30),
                               _per_example_shape(x))
    return max(best, _ascend_pairs(f, x, delta, free_pairs_steps, step_size, move_start=True))


def _per_example_norms(t):
    return tf.norm(tf.reshape(t, (tf.shape(t)[0], -1)), axis=1)


def _per_example_shape(x):
    return (-1,) + (1,) * (len(x.shape) - 1)


def _ascend_pairs(f, x, delta, steps, step_size, move_start):
    """The largest ||f(s + delta) - f(s)|| / ||delta|| found by gradient ascent
    from s = x: in delta, and with `move_start` in s too. Each step moves
    each by `step_size` times the pair's distance."""
    shape = _per_example_shape(x)
    shift = tf.zeros_like(x)
    best = 0.0
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch([shift, delta])
            start = x + shift if move_start else x
            ratio = (_per_example_norms(f(start + delta) - f(start))
                     / _per_example_norms(delta))
            total = tf.reduce_sum(ratio)
        best = max(best, float(tf.reduce_max(ratio)))
        grad_shift, grad = tape.gradient(total, [shift, delta])
        delta_norm = _per_example_norms(delta)
        delta = delta + step_size * tf.reshape(
            delta_norm / tf.maximum(_per_example_norms(grad), 1e-30), shape) * grad
        if move_start:
            shift = shift + step_size * tf.reshape(
                delta_norm / tf.maximum(_per_example_norms(grad_shift), 1e-30), shape) * grad_shift
    return best
