"""Which Keras layers are linear operators, and the geometry the spectral core needs.

A layer's singular values depend on more than its kernel: the spatial size of
its input, strides, dilation, groups and padding. This module reads all of
that from a built Keras 3 model so that users (and `constraints` /
`callbacks`) never work out input sizes by hand. It holds no math: the
kernels are only reshaped between the layer's layout and the convolution
layout of `tfconvnorm.spectral`.

By default (`boundary="layer"`) every geometry carries the layer's own zero
padding, so the spectral core bounds the layer the model actually computes:
its spectrum is that of the circular convolution on the embedding size N
(`tfconvnorm.spectral.circular_embedding`), an entrywise upper bound on the
layer's. `boundary="circular"` describes the published operator instead:
the circular convolution at the layer's own input size, which is *not* a
bound on a zero-padded layer.
"""

import dataclasses

import keras
import tensorflow as tf

from tfconvnorm import _compat
from tfconvnorm import spectral
from tfconvnorm.spectral.arguments import int_tuple

# The kinds of operator a kernel variable can be.
KIND_CONV = "conv"
KIND_DEPTHWISE = "depthwise"
KIND_CONV_TRANSPOSE = "conv_transpose"
KIND_SEPARABLE_DEPTHWISE = "separable_depthwise"
KIND_SEPARABLE_POINTWISE = "separable_pointwise"
KIND_DENSE = "dense"
ALL_KINDS = (KIND_CONV, KIND_DEPTHWISE, KIND_CONV_TRANSPOSE, KIND_SEPARABLE_DEPTHWISE,
             KIND_SEPARABLE_POINTWISE, KIND_DENSE)
# Every kind except Dense: what "all convolutions" means for clipping.
CONV_KINDS = tuple(kind for kind in ALL_KINDS if kind != KIND_DENSE)
# Recorded as `padding` for Dense layers, which have none.
DENSE_PADDING = "dense"
#: `boundary` choices of `model_geometry`: the layer's own zero padding (every
#: number a certified bound for the real layer), or the circular operator at
#: the layer's input size (the published operator, for reproducing the paper).
BOUNDARY_LAYER = "layer"
BOUNDARY_CIRCULAR = spectral.CIRCULAR
BOUNDARIES = (BOUNDARY_LAYER, BOUNDARY_CIRCULAR)


@dataclasses.dataclass(frozen=True)
class KindSpec:
    """What the package knows about one kind of kernel: the one table (`KINDS`)
    that geometry, the constraints and the Lipschitz bound read.

    Attributes:
      kind: its name (one of `ALL_KINDS`).
      layer_classes: the Keras layers owning a kernel of this kind.
      variable: the layer attribute holding the kernel variable.
      constraint_attribute: the layer attribute its constraint goes to.
      layout: the `layout` of an `OperatorNormConstraint` for this kernel:
        the kind whose variable layout it shares ("conv", "depthwise" or
        "conv_transpose").
      depthwise: the variable is `(*k, c_in, m)`, the convolution layout
        `(*k, 1, c_in * m)` with `groups = c_in` (`to_conv_layout`).
      fold_scale: `(value, scale) -> value` with a per-output-channel scale
        (a following BatchNormalization's) folded into the variable (in its
        own layout): the axis the layer's output channels live on.
    """

    kind: str
    layer_classes: tuple
    variable: str
    constraint_attribute: str
    layout: str
    depthwise: bool = False
    fold_scale: object = None


def _fold_last(value, scale):
    return value * scale


def _fold_depthwise(value, scale):
    # Output channel c * m + j is (c, j) of the (*k, c_in, m) variable.
    return value * scale.reshape(value.shape[-2:])


KINDS = {spec.kind: spec for spec in (
    KindSpec(KIND_CONV, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D),
             "kernel", "kernel_constraint", KIND_CONV, fold_scale=_fold_last),
    KindSpec(KIND_DEPTHWISE, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D),
             "kernel", "depthwise_constraint", KIND_DEPTHWISE, depthwise=True,
             fold_scale=_fold_depthwise),
    KindSpec(KIND_CONV_TRANSPOSE, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                                   keras.layers.Conv3DTranspose),
             "kernel", "kernel_constraint", KIND_CONV_TRANSPOSE,
             # (*k, filters, in): the filters are its outputs.
             fold_scale=lambda value, scale: value * scale[:, None]),
    KindSpec(KIND_SEPARABLE_DEPTHWISE, (keras.layers.SeparableConv1D,
                                        keras.layers.SeparableConv2D),
             "depthwise_kernel", "depthwise_constraint", KIND_DEPTHWISE, depthwise=True,
             fold_scale=_fold_depthwise),
    KindSpec(KIND_SEPARABLE_POINTWISE, (keras.layers.SeparableConv1D,
                                        keras.layers.SeparableConv2D),
             "pointwise_kernel", "pointwise_constraint", KIND_CONV, fold_scale=_fold_last),
    KindSpec(KIND_DENSE, (keras.layers.Dense,), "kernel", "kernel_constraint", KIND_CONV,
             fold_scale=_fold_last),
)}
assert set(KINDS) == set(ALL_KINDS)

_CONV_CLASSES = KINDS[KIND_CONV].layer_classes
_CONV_TRANSPOSE_CLASSES = KINDS[KIND_CONV_TRANSPOSE].layer_classes
_DEPTHWISE_CLASSES = KINDS[KIND_DEPTHWISE].layer_classes
_SEPARABLE_CLASSES = KINDS[KIND_SEPARABLE_DEPTHWISE].layer_classes
_DENSE_CLASSES = KINDS[KIND_DENSE].layer_classes
OPERATOR_LAYER_CLASSES = tuple(dict.fromkeys(
    cls for spec in KINDS.values() for cls in spec.layer_classes))


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Everything the spectral core needs about one kernel, plus provenance.

    Attributes:
      kernel_shape: kernel shape in the convolution layout
        `(*spatial, c_in // groups, c_out)` given to `tfconvnorm.spectral`
        (a depthwise kernel `(*k, c_in, m)` appears as `(*k, 1, c_in * m)`).
      input_shape: spatial input size given to the spectral core. For a
        transposed convolution, the input size of the strided convolution
        it is the adjoint of (same singular values): the layer's output size
        with a zero padding, its input size times the strides for
        "circular". `()` for Dense.
      strides, dilation_rate: per spatial axis.
      groups: channel groups (`c_in` for depthwise kernels).
      kind: one of `ALL_KINDS`.
      padding: the operator's padding, passed to the spectral core: the
        layer's own ('same', 'valid', 'causal'), "circular" for the
        published operator, 'dense' for Dense (no boundary).
      approximate: True when the input size was rounded up so that the
        stride divides it ("circular" only; the spectrum is then that of a
        slightly larger circular operator).
      layer_padding: the layer's own padding, where `padding` is
        "circular"; None when they agree.
    """

    kernel_shape: tuple
    input_shape: tuple
    strides: tuple
    dilation_rate: tuple
    groups: int
    kind: str
    padding: str = "same"
    approximate: bool = False
    layer_padding: str = None

    def spectral_kwargs(self):
        """Keyword arguments for the `tfconvnorm.spectral` functions."""
        kwargs = dict(input_shape=self.input_shape, strides=self.strides,
                      dilation_rate=self.dilation_rate, groups=self.groups)
        if self.kind != KIND_DENSE:
            kwargs["padding"] = self.padding
        return kwargs

    @property
    def embedding(self):
        """`tfconvnorm.spectral.CircularEmbedding` of the operator: the circular
        size N whose spectrum is computed, the output size and the pads."""
        if self.kind == KIND_DENSE:
            return spectral.CircularEmbedding((), (), ())
        return spectral.circular_embedding(self.kernel_shape[:-2], self.input_shape,
                                           self.strides, self.dilation_rate, self.padding)

    @property
    def embedding_shape(self):
        """The circular operator's input size N (`input_shape` for "circular")."""
        return self.embedding.input_shape

    @property
    def layer_input_shape(self):
        """Spatial size of the input of the layer (or layer part) itself."""
        if self.kind == KIND_CONV_TRANSPOSE:
            return self.embedding.output_shape
        return self.input_shape

    @property
    def is_certified(self):
        """True when the spectral core's numbers bound the layer itself: its own
        zero padding (or no boundary: Dense) and no rounding."""
        return not self.approximate and (
            self.kind == KIND_DENSE or self.padding != spectral.CIRCULAR
            or self.layer_padding in (None, spectral.CIRCULAR))


def circular_geometry(geometry, round_up=True):
    """The circular operator at the layer's own input size (what Sedghi et al.
    plotted, `boundary="circular"`) of a geometry given with the layer's
    padding; geometries already circular, and Dense, come back as they are.

    A stride that does not divide the input size rounds it up to the next
    multiple (`approximate=True`) or, with `round_up=False`, raises
    ValueError. A transposed convolution's forward operator acts on its input
    size times the strides; a separable layer's pointwise part (1x1, stride 1)
    keeps its size, where it is the same operator for every padding.
    """
    g = geometry
    if g.kind == KIND_DENSE or g.padding == spectral.CIRCULAR:
        return g
    if g.kind == KIND_CONV_TRANSPOSE:
        size, approximate = transposed_forward_size(
            g.layer_input_shape, g.kernel_shape[:-2], g.strides, g.dilation_rate,
            spectral.CIRCULAR), False
    else:  # the pointwise part's stride is 1
        size, approximate = _divisible_size("The layer", tuple(g.input_shape), g.strides,
                                            round_up)
    return dataclasses.replace(g, input_shape=size, padding=spectral.CIRCULAR,
                               approximate=approximate, layer_padding=g.padding)


def spectra_title(geometries):
    """What the spectra of these operators are, in words (plot titles)."""
    if all(g.padding == spectral.CIRCULAR or g.kind == KIND_DENSE for g in geometries):
        return "singular values of each layer's circular convolution"
    return "upper bounds on each layer's singular values (circular embedding of its padding)"


def conv_layout_shape(shape, kind):
    """The convolution-layout shape of a kernel of variable shape `shape`.

    Only depthwise kernels `(*k, c_in, m)` change: they become the grouped
    convolution kernel `(*k, 1, c_in * m)` with `groups = c_in`, whose output
    channel `c * m + j` is Keras' depthwise output channel order.
    """
    shape = tuple(int(d) for d in shape)
    if not KINDS[kind].depthwise:
        return shape
    return shape[:-2] + (1, shape[-2] * shape[-1])


def to_conv_layout(kernel, kind):
    """Reshapes a kernel (TensorFlow) from its variable layout to the
    convolution layout (`conv_layout_shape`)."""
    if not KINDS[kind].depthwise:
        return kernel
    kernel = tf.convert_to_tensor(kernel)
    return tf.reshape(kernel, conv_layout_shape(kernel.shape, kind))


def from_conv_layout(kernel, kind, variable_shape):
    """Inverse of `to_conv_layout`: back to the variable's own shape."""
    if not KINDS[kind].depthwise:
        return kernel
    return tf.reshape(kernel, tuple(variable_shape))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerOperator:
    """A kernel variable of a built Keras model, with its geometry.

    Attributes:
      name: unique tag, the kernel variable's path (e.g. "conv2d/kernel",
        "sep/depthwise_kernel").
      layer: the Keras layer owning the variable.
      variable: the `keras.Variable` holding the kernel.
      geometry: its `ConvGeometry`.
    """

    name: str
    layer: object
    variable: object
    geometry: ConvGeometry

    @property
    def constraint_attribute(self):
        """Name of the layer attribute holding this kernel's constraint."""
        return KINDS[self.geometry.kind].constraint_attribute

    def to_spectral(self, value):
        """Variable layout -> convolution layout for `tfconvnorm.spectral`."""
        return to_conv_layout(value, self.geometry.kind)

    def from_spectral(self, value):
        """Convolution layout -> the variable's own layout."""
        return from_conv_layout(value, self.geometry.kind, self.variable.shape)


def is_operator_layer(layer):
    """True for the layers whose kernels `layer_geometry` describes."""
    return isinstance(layer, OPERATOR_LAYER_CLASSES)


def _spatial_dims(layer, shape):
    """Spatial part of a full input shape (batch and channel axes dropped)."""
    shape = tuple(shape)
    rank = layer.rank
    if len(shape) < rank + 2:
        raise ValueError(f"Layer '{layer.name}' expects inputs of rank >= {rank + 2}; "
                         f"received input shape {shape}.")
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return shape[-rank:]
    return shape[-rank - 1:-1]


def _kernel_variable(layer, attribute):
    """The layer's kernel variable, refusing layers whose kernel is not one variable."""
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has LoRA enabled: its kernel is the sum of several "
            "variables, so no single variable can be constrained. Merge or disable LoRA "
            "first.")
    # Conv and Dense keep the variable in `_kernel` behind a `kernel` property.
    variable = getattr(layer, "_" + attribute, None) if attribute == "kernel" else None
    if variable is None:
        variable = getattr(layer, attribute, None)
    if not _compat.is_variable(variable):
        raise ValueError(f"Layer '{layer.name}' has no kernel variable `{attribute}`; "
                         f"received {type(variable).__name__}.")
    if not keras.backend.is_float_dtype(variable.dtype):
        raise ValueError(f"Layer '{layer.name}' has a {variable.dtype} kernel (a quantized "
                         "layer?); only floating-point kernels are linear operators here.")
    return variable


def _divisible_size(what, size, strides, round_up):
    """Checks that each stride divides the input size, or rounds the size up
    (for the circular operator only: a zero-padded layer needs neither).
    `what` names the layer in the error."""
    if all(n % s == 0 for n, s in zip(size, strides)):
        return size, False
    if not round_up:
        raise ValueError(
            f"{what}: its strides {strides} do not divide its input size "
            f"{size}, so the circular operator (boundary='circular') is not defined. Use "
            "the layer's own padding (boundary='layer', the default), pass round_up=True "
            "to use the next multiple of the stride (an approximation), or an input size "
            "the stride divides.")
    return tuple(-(-n // s) * s for n, s in zip(size, strides)), True


def conv_transpose_output_size(size, kernel_size, strides, dilation_rate, padding,
                               output_padding=None):
    """Spatial output size of a Keras Conv*DTranspose layer (Keras' own rule,
    per axis), i.e. the input size of the strided convolution it is the
    adjoint of."""
    rank = len(size)
    output_padding = (None,) * rank if output_padding is None else tuple(output_padding)
    result = []
    for n, k, s, d, extra in zip(size, kernel_size, strides, dilation_rate, output_padding):
        extent = (k - 1) * d + 1
        if padding == "valid":
            extra = max(extent, s) - extent if extra is None else extra
            result.append((n - 1) * s + extent + extra)
        elif extra is None:
            result.append(n * s)
        else:
            result.append((n - 1) * s + extent % 2 + extra)
    return tuple(result)


def transposed_forward_size(spatial, kernel_size, strides, dilation_rate, padding,
                            output_padding=None, what="The transposed convolution"):
    """Input size of the strided convolution a transposed one is the adjoint of.

    With a zero padding: the transposed layer's output size (Keras' rule),
    checked to map back onto its input size `spatial`. For "circular": the
    input size times the strides (always divisible).
    """
    spatial = tuple(spatial)
    if padding == spectral.CIRCULAR:
        return tuple(n * s for n, s in zip(spatial, strides))
    size = conv_transpose_output_size(spatial, kernel_size, strides, dilation_rate, padding,
                                      output_padding)
    forward = spectral.circular_embedding(kernel_size, size, strides, dilation_rate,
                                          padding).output_shape
    if forward != spatial:
        raise ValueError(
            f"{what}: a {padding!r} convolution of its output size {size} has output size "
            f"{forward}, not its input size {spatial}, so it is not that convolution's "
            f"adjoint (output_padding={output_padding}).")
    return size


def _operator_padding(layer, boundary):
    """(padding for the spectral core, the layer's own padding if it differs)."""
    if boundary == BOUNDARY_CIRCULAR:
        return spectral.CIRCULAR, layer.padding
    return layer.padding, None


def _unique_names(operators):
    """Variable paths are unique within one model; disambiguate anyway when not."""
    seen = {}
    result = []
    for op in operators:
        name = op.name
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[op.name]}"
            op = dataclasses.replace(op, name=name)
        else:
            seen[name] = 0
        result.append(op)
    return result


def _operators_for(layer, spatial, round_up=False, boundary=BOUNDARY_LAYER):
    """The `LayerOperator`s of one built layer whose spatial input size is known."""
    if isinstance(layer, _DENSE_CLASSES):
        variable = _kernel_variable(layer, KINDS[KIND_DENSE].variable)
        geometry = ConvGeometry(tuple(variable.shape), (), (), (), 1, KIND_DENSE,
                                DENSE_PADDING)
        return [LayerOperator(variable.path, layer, variable, geometry)]

    strides = tuple(layer.strides)
    dilation = tuple(layer.dilation_rate)
    padding, layer_padding = _operator_padding(layer, boundary)
    if isinstance(layer, _CONV_TRANSPOSE_CLASSES):
        variable = _kernel_variable(layer, KINDS[KIND_CONV_TRANSPOSE].variable)
        kernel_size = tuple(variable.shape[:-2])
        size = transposed_forward_size(spatial, kernel_size, strides, dilation, padding,
                                       layer.output_padding, f"Layer '{layer.name}'")
        geometry = ConvGeometry(tuple(variable.shape), size, strides, dilation, 1,
                                KIND_CONV_TRANSPOSE, padding, layer_padding=layer_padding)
        return [LayerOperator(variable.path, layer, variable, geometry)]

    size, approximate = ((spatial, False) if padding != spectral.CIRCULAR
                         else _divisible_size(f"Layer '{layer.name}'", spatial, strides,
                                              round_up))
    if isinstance(layer, _CONV_CLASSES):
        variable = _kernel_variable(layer, KINDS[KIND_CONV].variable)
        geometry = ConvGeometry(tuple(variable.shape), size, strides, dilation,
                                int(layer.groups), KIND_CONV, padding, approximate,
                                layer_padding)
        return [LayerOperator(variable.path, layer, variable, geometry)]

    if isinstance(layer, _DEPTHWISE_CLASSES):
        kind = KIND_DEPTHWISE
    else:  # separable
        kind = KIND_SEPARABLE_DEPTHWISE
    variable = _kernel_variable(layer, KINDS[kind].variable)
    shape = tuple(variable.shape)
    conv_shape = shape[:-2] + (1, shape[-2] * shape[-1])
    depthwise = LayerOperator(variable.path, layer, variable, ConvGeometry(
        conv_shape, size, strides, dilation, shape[-2], kind, padding, approximate,
        layer_padding))
    if kind == KIND_DEPTHWISE:
        return [depthwise]
    pointwise_variable = _kernel_variable(layer, KINDS[KIND_SEPARABLE_POINTWISE].variable)
    # The pointwise part is a 1x1 convolution of the depthwise part's output:
    # the same operator with every padding ('valid', no pads), and exactly
    # circular.
    pointwise_size = depthwise.geometry.embedding.output_shape
    rank = len(pointwise_size)
    pointwise = LayerOperator(pointwise_variable.path, layer, pointwise_variable, ConvGeometry(
        tuple(pointwise_variable.shape), pointwise_size, (1,) * rank, (1,) * rank, 1,
        KIND_SEPARABLE_POINTWISE, "valid" if padding != spectral.CIRCULAR else padding,
        approximate, layer_padding))
    return [depthwise, pointwise]


def _unknown_size_error(layer, size):
    return ValueError(
        f"Layer '{layer.name}': its spatial input size is unknown (received {size}); "
        "the singular values of a convolution depend on it. Pass it explicitly: "
        "`input_shape=` (the model's input shape without the batch axis, to "
        "model_geometry / constrain / the callbacks), `layer_input_shapes="
        "{layer_name: spatial_size}`, or `input_shape=` (spatial size) to "
        "layer_geometry.")


def _check_built(layer):
    if not layer.built:
        raise ValueError(
            f"'{layer.name}' is not built, so its kernels and input sizes are unknown. "
            "Build it first: call it on data, call `build(input_shape)`, or start it "
            "with `keras.Input(shape=...)`.")


def _recorded_input_shapes(layer):
    """Input shapes Keras recorded for a layer outside any model trace."""
    shapes = []
    for node in getattr(layer, "_inbound_nodes", []):
        if node.input_tensors:
            shapes.append(tuple(node.input_tensors[0].shape))
    build = getattr(layer, "_build_shapes_dict", None)
    if not shapes and build:
        first = tuple(build.values())[0]
        if first is not None:
            shapes.append(tuple(first))
    return shapes


def _agreed_spatial(layer, shapes):
    """The one spatial size in `shapes`; an error if the layer saw several."""
    sizes = []
    for shape in shapes:
        size = tuple(_spatial_dims(layer, shape))
        if size not in sizes:
            sizes.append(size)
    known = [s for s in sizes if all(d is not None for d in s)]
    if len(known) > 1:
        raise ValueError(
            f"Layer '{layer.name}' is called on inputs of different spatial sizes "
            f"{known}; its singular values differ for each. Give one size with "
            "`layer_input_shapes={name: size}`.")
    if known:
        return known[0]
    return sizes[0] if sizes else None


def check_boundary(boundary):
    if boundary not in BOUNDARIES:
        raise ValueError(f"`boundary` must be one of {BOUNDARIES}; received "
                         f"boundary={boundary!r}.")


def layer_geometry(layer, input_shape=None, round_up=False, boundary=BOUNDARY_LAYER):
    """Geometry of every linear-operator kernel of one built Keras layer.

    Args:
      layer: a built Conv{1,2,3}D, Conv{1,2,3}DTranspose, DepthwiseConv{1,2}D,
        SeparableConv{1,2}D (two kernels: depthwise and pointwise) or Dense.
      input_shape: spatial size of the layer's input (an int: the same on every
        axis). By default it is read from the shapes Keras recorded for the
        layer (its calls in a functional model, or its build shape).
      round_up: with `boundary="circular"`, when a stride does not divide the
        input size, use the next multiple of the stride (marked
        `approximate`) instead of raising. A zero-padded layer never needs it.
      boundary: "layer" (default): the layer's own zero padding, so that the
        spectral core bounds the layer itself; "circular": the published
        circular operator at the layer's input size (not a bound on a
        zero-padded layer).

    Returns:
      A list of `LayerOperator`, one per kernel variable.

    Raises:
      ValueError: the layer is not an operator layer, not built, its input size
        is unknown or ambiguous, or ("circular") a stride does not divide it.
    """
    check_boundary(boundary)
    if not is_operator_layer(layer):
        raise ValueError(
            f"Layer '{getattr(layer, 'name', layer)}' ({type(layer).__name__}) is not a "
            "linear operator layer; supported: "
            f"{', '.join(c.__name__ for c in OPERATOR_LAYER_CLASSES)}.")
    _check_built(layer)
    if isinstance(layer, _DENSE_CLASSES):
        return _unique_names(_operators_for(layer, ()))
    if input_shape is not None:
        spatial = int_tuple(input_shape, layer.rank, "input_shape", allow_none=True)
    else:
        spatial = _agreed_spatial(layer, _recorded_input_shapes(layer))
    if spatial is None or any(d is None for d in spatial):
        raise _unknown_size_error(layer, spatial)
    if not all(d > 0 for d in spatial):
        raise ValueError(f"Layer '{layer.name}': input sizes must be positive; received "
                         f"input_shape={spatial}.")
    return _unique_names(_operators_for(layer, spatial, round_up, boundary))


# ---------------------------------------------------------------------------
# Reading input sizes from a model's graph.


functional_of = _compat.functional_of


def walk_graph(functional, inputs, step):
    """Visits every call of a functional graph in order, carrying one value per tensor.

    The one walker of a Keras graph (input sizes here, Lipschitz bounds in
    `lipschitz.py`). `inputs`: one value per input of `functional`.
    `step(node, values, known)` gets a call's operation node, the values of its
    input tensors and the map `known` (id of a tensor -> value, for
    `node.arguments.fill_in`); it returns one value per output tensor, or None
    to leave the outputs unknown (calls that read them are then skipped).
    Nested models are the step's to walk (calling `walk_graph` again).
    Returns the values of `functional`'s outputs (None where unknown).
    """
    known = {id(x): y for x, y in zip(functional.inputs, inputs)}
    by_depth = _compat.nodes_by_depth(functional)
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            if any(id(x) not in known for x in node.input_tensors):
                continue
            outputs = step(node, [known[id(x)] for x in node.input_tensors], known)
            if outputs is None:
                continue
            for x, y in zip(node.outputs, outputs):
                known[id(x)] = y
    return [known.get(id(x)) for x in functional.outputs]


def _record_input_shapes(functional, inputs, seen_shapes):
    """Propagates input specs through a functional graph, recording each call's input.

    Like Keras' own `Function._run_through_graph`, but it records the input
    shape of every operation and steps into nested models, so that layers of
    an inner model get the sizes the outer model gives them (an inner model
    may declare `None` sizes). Calls whose inputs have the shapes recorded at
    graph construction reuse the recorded outputs; only the others are
    recomputed with `compute_output_spec`.
    """
    def step(node, new_inputs, known):
        op = node.operation
        if new_inputs:
            seen_shapes.setdefault(id(op), []).append(tuple(new_inputs[0].shape))
        inner = functional_of(op)
        if inner is not None:
            args, _ = node.arguments.fill_in(known)
            outputs = _record_input_shapes(inner, args[0] if args else new_inputs, seen_shapes)
        elif all(tuple(a.shape) == tuple(b.shape)
                 for a, b in zip(new_inputs, node.input_tensors)):
            outputs = node.outputs
        else:
            args, kwargs = node.arguments.fill_in(known)
            try:
                outputs = op.compute_output_spec(*args, **kwargs)
            except Exception:  # pylint: disable=broad-except
                # Downstream calls are then skipped and fall back to the
                # shapes recorded at build time (or ask for them).
                return None
        return _compat.tree_flatten(outputs)

    return walk_graph(functional, _compat.tree_flatten(inputs), step)


def _input_specs(functional, input_shape):
    """KerasTensors to start the walk: the model's own, or `input_shape` (no batch)."""
    if input_shape is None:
        return list(functional.inputs)
    shapes = input_shape
    if len(functional.inputs) == 1 and (not shapes or not isinstance(shapes[0], (list, tuple))):
        shapes = [shapes]
    if len(shapes) != len(functional.inputs):
        raise ValueError(f"`input_shape` must give one shape per model input "
                         f"({len(functional.inputs)}); received input_shape={input_shape!r}.")
    specs = []
    for x, shape in zip(functional.inputs, shapes):
        shape = tuple(shape)
        if len(shape) != len(x.shape) - 1:
            raise ValueError(f"`input_shape` is the shape of one sample without the batch "
                             f"axis, like keras.Input(shape=...): expected {len(x.shape) - 1} "
                             f"dims for input '{x.name}' of shape {x.shape}; received "
                             f"input_shape={input_shape!r}.")
        specs.append(keras.KerasTensor((x.shape[0],) + shape, dtype=x.dtype))
    return specs


def _layer_names(model):
    return [layer.name for layer in _compat.flatten_layers(model)]


def model_geometry(model, layers=None, input_shape=None, layer_input_shapes=None,
                   kinds=None, round_up=False, boundary=BOUNDARY_LAYER):
    """Every linear-operator kernel of a built Keras model, with its geometry.

    Input sizes come from the model's own graph: functional and Sequential
    models (nested ones included, with the sizes the outer model gives them),
    and layers called more than once (an error if the sizes differ). Layers of
    subclassed models fall back to the shape they were built with.

    Args:
      model: a built `keras.Model`.
      layers: names of layers (or kernel variable paths) to keep; default all.
      input_shape: the model's input shape without the batch axis (a list of
        shapes for several inputs). Needed when the model declares `None`
        spatial sizes.
      layer_input_shapes: `{layer_name: spatial_size}` overriding sizes read
        from the model.
      kinds: operator kinds to keep (see `ALL_KINDS`, `CONV_KINDS`); default all.
      round_up, boundary: see `layer_geometry`. By default every geometry is
        that of the layer's own zero padding.

    Returns:
      A list of `LayerOperator`, depth first over the model's layers.

    Raises:
      ValueError: the model is not built, a name in `layers` is unknown or not
        an operator layer, or a needed input size is unknown or inconsistent.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model; received {type(model).__name__}.")
    _check_built(model)
    check_boundary(boundary)
    if kinds is not None:
        unknown = [k for k in kinds if k not in ALL_KINDS]
        if unknown:
            raise ValueError(f"Unknown operator kinds {unknown}; expected some of {ALL_KINDS}.")
    all_layers = _compat.flatten_layers(model)
    layer_input_shapes = dict(layer_input_shapes or {})
    names = set(_layer_names(model))
    missing = [n for n in layer_input_shapes if n not in names]
    if missing:
        raise ValueError(f"`layer_input_shapes` names layers not in model '{model.name}': "
                         f"{missing}. Available layers: {sorted(names)}.")

    seen_shapes = {}
    functional = functional_of(model)
    if functional is not None:
        _record_input_shapes(functional, _input_specs(functional, input_shape), seen_shapes)
    elif input_shape is not None:
        # A subclassed model: symbolic tracing is not possible without data,
        # so the sizes come from the layers' own build shapes.
        raise ValueError(f"`input_shape` needs a functional or Sequential model; "
                         f"'{model.name}' is subclassed. Use `layer_input_shapes=` instead.")

    wanted = None if layers is None else {layers} if isinstance(layers, str) else set(layers)
    operators = []
    for layer in all_layers:
        if not is_operator_layer(layer):
            continue
        try:
            operators.extend(_model_layer_operators(layer, seen_shapes, layer_input_shapes,
                                                    round_up, boundary))
        except ValueError:
            # A layer left out by `layers` (given by layer name or variable
            # path "<...>/<layer>/<kernel>") may be one we cannot describe.
            if wanted is None or layer.name in wanted or any(
                    name.split("/")[-2:-1] == [layer.name] for name in wanted):
                raise
    operators = _unique_names(operators)
    if kinds is not None:
        operators = [op for op in operators if op.geometry.kind in kinds]
    return select_operators(operators, layers, model)


def _model_layer_operators(layer, seen_shapes, layer_input_shapes, round_up, boundary):
    """`layer_geometry` with the input size read from the model walk."""
    if isinstance(layer, _DENSE_CLASSES):
        return layer_geometry(layer)
    if layer.name in layer_input_shapes:
        size = layer_input_shapes[layer.name]
    else:
        size = None
        shapes = seen_shapes.get(id(layer), [])
        if shapes:
            size = _agreed_spatial(layer, shapes)
        if size is None or any(d is None for d in size):
            recorded = _agreed_spatial(layer, _recorded_input_shapes(layer))
            if recorded is not None and all(d is not None for d in recorded):
                size = recorded
    spatial = None if size is None else int_tuple(size, layer.rank, "input_shape",
                                                   allow_none=True)
    if spatial is None or any(d is None for d in spatial):
        raise _unknown_size_error(layer, size)
    return layer_geometry(layer, input_shape=size, round_up=round_up, boundary=boundary)


def select_operators(operators, layers, model=None):
    """Keeps the operators named in `layers` (layer names or variable paths)."""
    if layers is None:
        return operators
    if isinstance(layers, str):
        layers = [layers]
    wanted = list(layers)
    available = sorted({op.layer.name for op in operators} | {op.name for op in operators})
    unknown = [n for n in wanted if n not in available]
    if unknown:
        detail = ""
        if model is not None:
            other = [n for n in unknown if n in set(_layer_names(model))]
            if other:
                detail = f" ({other} exist but are not linear-operator layers of the kinds asked for)"
        raise ValueError(f"Unknown layer names {unknown}{detail}. Available: {available}.")
    return [op for op in operators if op.layer.name in wanted or op.name in wanted]

