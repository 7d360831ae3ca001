"""Keras glue: an operator-norm constraint, a regularizer, and `constrain(model)`.

The math lives in `tfconvnorm.spectral`; these classes only carry the layer
geometry (which Keras does not pass to a constraint), reshape depthwise
kernels, and handle dtypes. The constraint and the regularizer are `keras.ops`
only and run on every Keras backend (TensorFlow, JAX, PyTorch), inside each
backend's compiled train step; `operator_norm` (the exact norm) is the
TensorFlow core's, on the host under the other backends.

Which operator: `padding=` names the layer's own padding ('same', 'valid',
'causal', explicit pads), and the norm is then that of the circular
convolution on the embedding size N, which contains the zero-padded layer as
a submatrix: an upper bound on the layer's norm, so constraining it
constrains the layer. `padding="circular"` (the default for a constraint
built by hand, as in the raw spectral functions) is the published circular
operator at the layer's input size, which does *not* bound a zero-padded
layer. `constrain()` always passes the layer's own padding.

XLA and other backends: Keras compiles the train step with XLA when
`compile(jit_compile=True)` is given, or with `jit_compile="auto"` (the
default) on a machine with a GPU. Every method of the constraint and the
regularizer runs on the matmul path (`tfconvnorm.spectral.matmul`: a
certified Gram-iteration upper bound and the clip by Newton-Schulz
iterations, static shapes), which compiles under XLA; `constrain()` leaves
the model's `jit_compile` as it is. In a TensorFlow graph without XLA the
constraint runs its projection as one XLA-compiled function all the same
(`_xla_projection`).
"""

import functools
import json

import keras
from keras import ops
import tensorflow as tf

from tfconvnorm import geometry as geometry_lib
from tfconvnorm import spectral
from tfconvnorm.spectral.arguments import (check_method, check_positive, check_positive_int,
                                         core_tensor, int_tuple)
from tfconvnorm.spectral import matmul as matmul_lib
from tfconvnorm.spectral import padding as padding_lib
from tfconvnorm.spectral.operator import prepare_kernel

#: Kernel layouts a constraint/regularizer accepts (see OperatorNormConstraint):
#: the kinds whose variable layouts the others share (`geometry.KINDS[k].layout`).
LAYOUT_CONV = geometry_lib.KIND_CONV
LAYOUT_DEPTHWISE = geometry_lib.KIND_DEPTHWISE
LAYOUT_CONV_TRANSPOSE = geometry_lib.KIND_CONV_TRANSPOSE
LAYOUTS = tuple(dict.fromkeys(spec.layout for spec in geometry_lib.KINDS.values()))

#: What a constraint does after every optimizer step by default: rescale the
#: kernel onto the ball (like keras.constraints.MaxNorm, with the certified
#: operator norm): one norm per step, not a projection.
DEFAULT_CONSTRAINT_METHOD = "rescale"


class _OperatorGeometry:
    """Geometry arguments shared by the constraint and the regularizer."""

    def __init__(self, input_shape, strides, dilation_rate, groups, layout,
                 padding=spectral.CIRCULAR, output_padding=None):
        if layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS}; received layout={layout!r}.")
        if isinstance(input_shape, (list, tuple)) and not input_shape:
            self.input_shape = ()
        else:
            self.input_shape = int_tuple(input_shape, None, "input_shape")
        self.strides = int_tuple(strides, None, "strides")
        self.dilation_rate = int_tuple(dilation_rate, None, "dilation_rate")
        groups = check_positive_int(groups, "groups")
        if layout == LAYOUT_DEPTHWISE and groups != 1:
            raise ValueError("With layout='depthwise' the groups are the input channels, "
                             f"read from the kernel; leave groups=1. Received groups={groups}.")
        self.groups = groups
        self.layout = layout
        self.padding = padding_lib.normalize_padding(padding, None)
        if output_padding is not None:
            if layout != LAYOUT_CONV_TRANSPOSE:
                raise ValueError("`output_padding` is an argument of transposed convolutions "
                                 "(layout='conv_transpose'); received output_padding="
                                 f"{output_padding!r} with layout={layout!r}.")
            items = (output_padding if isinstance(output_padding, (list, tuple))
                     else [output_padding])
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
                raise ValueError("`output_padding` must be None, a non-negative int or a tuple "
                                 f"of them; received output_padding={output_padding!r}.")
            if isinstance(output_padding, list):
                output_padding = tuple(output_padding)
        self.output_padding = output_padding

    def spectral_args(self, kernel_shape):
        """Keyword arguments of the spectral functions for a kernel of this shape
        (in the conv layout)."""
        rank = len(kernel_shape) - 2

        def per_axis(value):
            return (value,) * rank if isinstance(value, int) else tuple(value)

        input_shape = self.input_shape
        groups = self.groups
        if self.layout == LAYOUT_CONV_TRANSPOSE:
            # The adjoint of a strided conv: that conv's input size.
            input_shape = geometry_lib.transposed_forward_size(
                per_axis(input_shape), tuple(kernel_shape[:rank]), per_axis(self.strides),
                per_axis(self.dilation_rate), self.padding,
                None if self.output_padding is None else per_axis(self.output_padding),
                "The transposed convolution this constraint describes")
        elif self.layout == LAYOUT_DEPTHWISE:
            groups = kernel_shape[-2]
        return dict(input_shape=input_shape, strides=self.strides,
                    dilation_rate=self.dilation_rate, groups=groups, padding=self.padding)

    def kind(self):
        return self.layout  # a layout is the kind whose variable layout it is

    def config(self):
        config = dict(input_shape=self.input_shape, strides=self.strides,
                      dilation_rate=self.dilation_rate, groups=self.groups, layout=self.layout,
                      padding=self.padding)
        if self.output_padding is not None:
            config["output_padding"] = self.output_padding
        return config


def _operator_norm(geometry, w):
    """(exact operator norm of the kernel `w` in its own layout, w's dtype)."""
    kernel, dtype = core_tensor(w)
    conv = geometry_lib.to_conv_layout(kernel, geometry.kind())
    return spectral.conv_operator_norm(conv, **geometry.spectral_args(kernel.shape)), dtype


def _matmul_kernel(geometry, w):
    """(the kernel `w` in the conv layout and the working dtype, as a tensor of
    Keras' backend; its `matmul` geometry; w's shape; w's dtype name). The finiteness
    check raises where the backend can (`backend_kernel`); under XLA / jit a
    NaN kernel (already written by the optimizer) stays NaN."""
    kernel, dtype = matmul_lib.backend_kernel(w)
    conv = ops.reshape(kernel, geometry_lib.conv_layout_shape(kernel.shape, geometry.kind()))
    g = matmul_lib.geometry_of(conv.shape, **geometry.spectral_args(kernel.shape))
    return conv, g, kernel.shape, dtype


def _norm_upper_bound(geometry, w):
    """(certified upper bound on the norm of the kernel `w` in its own layout, on
    the matmul path (keras.ops: compiles under XLA and JAX's jit), in the
    working dtype; w's dtype name)."""
    conv, g, _, dtype = _matmul_kernel(geometry, w)
    return matmul_lib.norm_upper_bound(conv, g), dtype


@keras.saving.register_keras_serializable(package="tfconvnorm")
class OperatorNormConstraint(keras.constraints.Constraint):
    """Constrains a convolution's exact operator norm (largest singular value).

    After each optimizer step Keras replaces the kernel by a kernel of the same
    shape whose operator has norm <= `max_norm` (Sedghi et al., ICLR 2019).
    With the layer's own `padding` the operator is the circular convolution
    on the embedding size N that contains the zero-padded layer, so the
    layer's own norm is within the bound afterwards. Stateless; serializable.
    Runs on the matmul path (certified upper bound, Newton-Schulz clip; see
    `tfconvnorm.spectral.matmul`): compiles under XLA.

    Kernel layouts (`layout`):
      * "conv": `(*kernel_size, in_channels // groups, filters)`, as Conv1D/2D/3D,
        the pointwise kernel of SeparableConv and Dense (`(in, out)` with
        `input_shape=()`).
      * "depthwise": `(*kernel_size, in_channels, depth_multiplier)`, the
        kernel of DepthwiseConv and the depthwise kernel of SeparableConv
        (groups are the input channels).
      * "conv_transpose": `(*kernel_size, filters, in_channels)` of
        Conv{1,2,3}DTranspose, whose operator is the adjoint of a strided
        convolution and has the same singular values.

    Args:
      max_norm: the bound, a finite number > 0.
      input_shape: spatial size of the layer's input (an int: every axis);
        `()` for Dense. For "conv_transpose" too it is the layer's input size.
      strides, dilation_rate: the layer's, int or per-axis tuple. With
        padding="circular" each stride must divide the input size
        (transposed layers excepted).
      groups: the layer's `groups` (layout "conv" only).
      padding: the layer's padding, "same", "valid", "causal" or per-axis
        (before, after) pairs: the constraint then bounds the real layer.
        "circular" (the default, for configs saved before this argument
        existed) constrains the published circular operator at
        `input_shape`, which does not bound a zero-padded layer.
      output_padding: the transposed layer's `output_padding` (layout
        "conv_transpose" only), which with a zero padding fixes its output
        size.
      method: "rescale" (default: divide by the certified upper bound where
        it exceeds `max_norm`, like `keras.constraints.MaxNorm`; a kernel
        inside comes back unchanged), "alternating" (clip and cut back a few
        times, then the certified rescale), "exact" (the Euclidean
        projection by Dykstra's loop, then the certified rescale) or "paper"
        (the published single clip, which does not guarantee the bound); see
        `tfconvnorm.clip_conv_singular_values`, the exact `eigh` version of
        the same projections. The bound holds as computed for every method
        but "paper".
      iterations: rounds for "alternating" / cap for "exact" (None: default).
      layout: "conv", "depthwise" or "conv_transpose", as above.

    Usage:

    >>> layer = keras.layers.Conv2D(
    ...     16, 3, strides=2, padding="same",
    ...     kernel_constraint=OperatorNormConstraint(1.0, input_shape=(32, 32), strides=2,
    ...                                              padding="same"))

    `tfconvnorm.constrain(model, 1.0)` attaches these with the right geometry
    to every layer of a built model. The model may be compiled with XLA (see
    the module docstring).
    """

    def __init__(self, max_norm, input_shape, strides=1, dilation_rate=1, groups=1,
                 method=DEFAULT_CONSTRAINT_METHOD, iterations=None, layout=LAYOUT_CONV,
                 padding=spectral.CIRCULAR, output_padding=None):
        self.max_norm = check_positive(max_norm, "max_norm")
        check_method(method)
        if iterations is not None and (isinstance(iterations, bool)
                                       or not isinstance(iterations, int) or iterations < 1):
            raise ValueError(f"`iterations` must be None or a positive int; received "
                             f"iterations={iterations!r}.")
        self.method = method
        self.iterations = iterations
        self._geometry = _OperatorGeometry(input_shape, strides, dilation_rate, groups, layout,
                                           padding, output_padding)

    input_shape = property(lambda self: self._geometry.input_shape)
    layout = property(lambda self: self._geometry.layout)
    padding = property(lambda self: self._geometry.padding)

    # Not converted by AutoGraph inside a user's tf.function: the matmul path
    # has its loops and branches as ops already, and AutoGraph once mixed up
    # its functions (a converted `geometry_of` called as `norm_upper_bound`).
    @tf.autograph.experimental.do_not_convert
    def __call__(self, w):
        if keras.backend.backend() == "tensorflow" and tf.inside_function():
            # In a TensorFlow graph (the train step, with XLA or without): one
            # XLA cluster per constraint, not ~40 small ops per squaring.
            kernel = prepare_kernel(w.value if isinstance(w, keras.Variable) else w)
            return _xla_projection(self)(kernel)
        return self._project(w)

    def _project(self, w):
        # The matmul path for every method (keras.ops, static shapes): compiles
        # under XLA and JAX's jit, runs on every Keras backend.
        conv, g, shape, dtype = _matmul_kernel(self._geometry, w)
        projected = matmul_lib.project(conv, g, self.max_norm, self.method, self.iterations,
                                       out_dtype=dtype)
        return ops.reshape(projected, shape)

    def operator_norm(self, w):
        """The norm this constraint bounds, for the kernel `w` (same layout)."""
        norm, dtype = _operator_norm(self._geometry, w)
        if keras.backend.backend() == "tensorflow":
            return tf.cast(norm, dtype)
        # Computed by the TensorFlow core on the host (the exact path is
        # TensorFlow's), returned as a tensor of Keras' backend.
        return ops.cast(ops.convert_to_tensor(norm.numpy()), dtype.name)

    def norm_upper_bound(self, w):
        """The certified upper bound on that norm that "rescale" divides by
        (`tfconvnorm.conv_operator_norm_upper_bound`), in w's dtype."""
        bound, dtype = _norm_upper_bound(self._geometry, w)
        return ops.cast(bound, dtype)

    def get_config(self):
        config = dict(max_norm=self.max_norm, method=self.method, iterations=self.iterations)
        config.update(self._geometry.config())
        return config

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _xla_projection(constraint):
    """The projection of constraints configured as `constraint`, as one
    `tf.function(jit_compile=True)`.

    Without XLA a TensorFlow graph runs the matmul path op by op: each of its
    small ops pays a launch, and the step's graph grows by thousands of ops
    that the first step traces (BENCHMARKS.md). Nested in an XLA-compiled step the
    function is compiled with it. One function per configuration, so layers
    of one geometry share it and its compilations (it retraces per kernel
    shape and dtype). The finiteness check runs before, in the caller's graph
    (`prepare_kernel`): a NaN kernel raises there as before without XLA.
    """
    return _xla_function(type(constraint), json.dumps(constraint.get_config(), sort_keys=True))


@functools.lru_cache(maxsize=256)
def _xla_function(cls, config):
    return tf.function(cls.from_config(json.loads(config))._project,  # pylint: disable=protected-access
                       jit_compile=True, autograph=False)


@keras.saving.register_keras_serializable(package="tfconvnorm")
class OperatorNormRegularizer(keras.regularizers.Regularizer):
    """Penalises a convolution's exact operator norm above a threshold.

    Adds `weight * max(0, sigma_max - threshold)` to the loss, where
    `sigma_max` is the certified upper bound (matmul path, compiles under XLA;
    at least the exact norm, typically within 0.1% of it, see BENCHMARKS.md) on the norm `OperatorNormConstraint`
    bounds with the same geometry (with the layer's `padding`: an upper bound
    on the zero-padded layer's norm). Differentiable; stateless; serializable. Arguments
    `input_shape`, `strides`, `dilation_rate`, `groups`, `layout`, `padding`
    and `output_padding` are those of `OperatorNormConstraint`.

    Args:
      weight: penalty factor, a finite number >= 0.
      threshold: norm below which there is no penalty, >= 0.

    Usage:

    >>> layer = keras.layers.Conv2D(
    ...     16, 3, padding="same",
    ...     kernel_regularizer=OperatorNormRegularizer(1e-3, input_shape=(32, 32),
    ...                                                threshold=1.0, padding="same"))
    """

    def __init__(self, weight, input_shape, strides=1, dilation_rate=1, groups=1,
                 threshold=0.0, layout=LAYOUT_CONV, padding=spectral.CIRCULAR,
                 output_padding=None):
        self.weight = check_positive(weight, "weight", allow_zero=True)
        self.threshold = check_positive(threshold, "threshold", allow_zero=True)
        self._geometry = _OperatorGeometry(input_shape, strides, dilation_rate, groups, layout,
                                           padding, output_padding)

    input_shape = property(lambda self: self._geometry.input_shape)
    layout = property(lambda self: self._geometry.layout)

    @tf.autograph.experimental.do_not_convert  # as OperatorNormConstraint.__call__
    def __call__(self, x):
        norm, dtype = _norm_upper_bound(self._geometry, x)
        penalty = self.weight * ops.relu(norm - ops.cast(self.threshold, norm.dtype))
        return ops.cast(penalty, dtype)

    def get_config(self):
        config = dict(weight=self.weight, threshold=self.threshold)
        config.update(self._geometry.config())
        return config

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _geometry_args(operator):
    """Constraint arguments reproducing a `LayerOperator`'s geometry."""
    geometry = operator.geometry
    layout = geometry_lib.KINDS[geometry.kind].layout
    args = dict(input_shape=geometry.layer_input_shape, strides=geometry.strides or 1,
                dilation_rate=geometry.dilation_rate or 1,
                groups=geometry.groups if layout == LAYOUT_CONV else 1, layout=layout,
                padding=(spectral.CIRCULAR if geometry.kind == geometry_lib.KIND_DENSE
                         else geometry.padding))
    if layout == LAYOUT_CONV_TRANSPOSE and geometry.padding != spectral.CIRCULAR:
        output_padding = getattr(operator.layer, "output_padding", None)
        args["output_padding"] = None if output_padding is None else tuple(output_padding)
    return args


def constraint_for(operator, max_norm, method=DEFAULT_CONSTRAINT_METHOD, iterations=None):
    """An `OperatorNormConstraint` with the geometry of a `LayerOperator`."""
    return OperatorNormConstraint(max_norm, method=method, iterations=iterations,
                                  **_geometry_args(operator))


def constrain(model, max_norm, method=DEFAULT_CONSTRAINT_METHOD, layers=None, kinds=None,
              iterations=None, apply_now=False, **geometry_kwargs):
    """Attaches `OperatorNormConstraint`s to the operator layers of a built model.

    Each kernel gets a constraint with its own geometry (input size read from
    the model, strides, dilation, groups, layout, and the layer's own
    padding, so that the bound holds for the layer the model computes), set
    both on the variable (used by the optimizer) and on the layer's
    `*_constraint` attribute (saved with the model). A compiled model's train
    function is reset so the next `fit` uses them; its `jit_compile` is left
    as it is (every method compiles under XLA).
    Like any Keras constraint, they act after each optimizer step; pass
    `apply_now=True` to also project the current kernels at once.

    Args:
      model: a built `keras.Model`.
      max_norm: the bound, a finite number > 0.
      method, iterations: see `OperatorNormConstraint`.
      layers: layer names (or kernel variable paths) to constrain; default all
        operator layers (convolutions of every kind and Dense).
      kinds: operator kinds to constrain, e.g. `tfconvnorm.CONV_KINDS`.
      apply_now: project the kernels now too (all computed before any is
        assigned, so a non-finite kernel leaves every kernel unchanged).
      **geometry_kwargs: `input_shape`, `layer_input_shapes`, `boundary`,
        `round_up`, as for `tfconvnorm.model_geometry` (`boundary="circular"`:
        constrain the published circular operators instead).

    Returns:
      `{kernel variable path: OperatorNormConstraint}`, what was attached.

    Raises:
      ValueError: bad `max_norm`, model not built, unknown layer name, unknown
        input size, a stride that does not divide its input size, or a kernel
        that already has a constraint of another type.
    """
    check_positive(max_norm, "max_norm")
    operators = geometry_lib.model_geometry(model, layers=layers, kinds=kinds,
                                            **geometry_kwargs)
    for op in operators:
        existing = getattr(op.layer, op.constraint_attribute, None)
        if existing is not None and not isinstance(existing, OperatorNormConstraint):
            raise ValueError(
                f"Layer '{op.layer.name}' already has {op.constraint_attribute}="
                f"{existing!r}; remove it before attaching an operator-norm constraint.")
    attached = {op.name: constraint_for(op, max_norm, method, iterations) for op in operators}
    if apply_now:
        projected = [attached[op.name](op.variable) for op in operators]
        for op, value in zip(operators, projected):
            op.variable.assign(value)
    for op in operators:
        op.variable.constraint = attached[op.name]
        setattr(op.layer, op.constraint_attribute, attached[op.name])
    if getattr(model, "compiled", False):
        # The cached train function was traced without the constraints.
        model.train_function = None
    return attached
