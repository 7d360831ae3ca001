"""Networks whose l2 Lipschitz constant is certified small by construction.

`lipschitz_convnet` and `lipschitz_resnet` build models for which
`tfconvnorm.lipschitz_bound(model) <= lipschitz` holds before, during and after
training:

* every conv and Dense kernel carries an `OperatorNormConstraint` at
  `LAYER_BOUND` (just under 1: headroom for the float64 rounding of the
  certificate's own per-layer bounds) on its own zero-padded operator, on the
  matmul path (certified as computed; compiles under XLA and `jax.jit`), and
  is projected at once when the model is built;
* no normalisation layer with a free scale (no BatchNormalization);
* activations are 1-Lipschitz: ReLU, or `MaxMin` (GroupSort with groups of 2,
  Anil, Lucas & Grosse 2019), which also preserves gradient norms;
* a residual block is the mean of its skip path and its branch
  (`keras.layers.Average`): (1 + 1) / 2 = 1 by the certificate's rules, the
  skip path a constrained 1x1 conv where the shape changes;
* the logits are multiplied by `lipschitz` at the end (`Rescaling`).

Inputs are used as given (no preprocessing layer inside): scale them before.
"""

import keras
from keras import ops

from tfconvnorm import constraints as constraints_lib

#: Every constrained layer's bound: the certificate's per-layer upper bounds are
#: float64 computations widened by 1e-9 of the true norm, so a product of
#: layers constrained to exactly 1 could be certified at 1 + 1e-8.
LAYER_BOUND = 1.0 - 1e-6
ACTIVATIONS = ("relu", "maxmin")


@keras.saving.register_keras_serializable(package="tfconvnorm")
class MaxMin(keras.layers.Layer):
    """GroupSort of group size 2 on the channel axis: the channels in two halves
    a, b become (max(a, b), min(a, b)).

    1-Lipschitz in l2 (on each pair a permutation of its two entries, and
    continuous), and its Jacobian is a permutation almost everywhere, so it
    keeps gradient norms (unlike ReLU). The channel count must be even.
    """

    def call(self, inputs):
        a, b = ops.split(inputs, 2, axis=-1)
        return ops.concatenate([ops.maximum(a, b), ops.minimum(a, b)], axis=-1)

    def build(self, input_shape):
        if input_shape[-1] is None or input_shape[-1] % 2:
            raise ValueError(f"MaxMin needs an even number of channels; layer '{self.name}' "
                             f"got input shape {tuple(input_shape)}.")
        super().build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape


def _activation(name, prefix):
    if name == "relu":
        return keras.layers.ReLU(name=f"{prefix}_relu")
    return MaxMin(name=f"{prefix}_maxmin")


def _check(input_shape, num_classes, lipschitz, activation):
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3
            or not all(isinstance(d, int) and d > 0 for d in input_shape)):
        raise ValueError(f"`input_shape` must be (height, width, channels) of positive ints; "
                         f"received input_shape={input_shape!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an int >= 2; received "
                         f"num_classes={num_classes!r}.")
    from tfconvnorm.spectral.arguments import check_positive  # pylint: disable=import-outside-toplevel
    lipschitz = check_positive(lipschitz, "lipschitz")
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {ACTIVATIONS}; received "
                         f"activation={activation!r}.")
    return tuple(input_shape), lipschitz


def _finish(model, lipschitz, method):
    """Constrains every linear layer and projects the initial kernels."""
    constraints_lib.constrain(model, LAYER_BOUND, method=method, apply_now=True)
    return model


def _head(x, num_classes, lipschitz, name):
    logits = keras.layers.Dense(num_classes, name=f"{name}_logits")(x)
    return keras.layers.Rescaling(lipschitz, name=f"{name}_lipschitz")(logits)


def lipschitz_convnet(input_shape, num_classes, lipschitz=1.0, widths=(32, 64),
                      activation="relu", method="rescale", name="lipschitz_convnet"):
    """A plain ConvNet with `lipschitz_bound(model) <= lipschitz` by construction.

    Per width: a 3x3 conv, the activation, a 3x3 conv with stride 2, the
    activation; then Flatten and a Dense classifier, times `lipschitz`.

    Args:
      input_shape: (height, width, channels).
      num_classes: number of logits (>= 2).
      lipschitz: the certified l2 Lipschitz constant of the logits (> 0).
      widths: channels of each stage (even for "maxmin").
      activation: "relu" or "maxmin".
      method: the constraint's method (`OperatorNormConstraint`): "rescale"
        (default), "alternating" or "exact"; all keep the bound certified.
    """
    input_shape, lipschitz = _check(input_shape, num_classes, lipschitz, activation)
    inputs = keras.Input(input_shape, name="images")
    x = inputs
    for i, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", name=f"conv{i}a")(x)
        x = _activation(activation, f"conv{i}a")(x)
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", name=f"conv{i}b")(x)
        x = _activation(activation, f"conv{i}b")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    model = keras.Model(inputs, _head(x, num_classes, lipschitz, "head"), name=name)
    return _finish(model, lipschitz, _certified_method(method))


def _certified_method(method):
    if method not in ("rescale", "alternating", "exact"):
        raise ValueError("`method` must be one that keeps the bound certified, 'rescale', "
                         f"'alternating' or 'exact'; received method={method!r}.")
    return method


def lipschitz_resnet(input_shape, num_classes, depth, lipschitz=1.0, width=16,
                     activation="relu", method="rescale", name=None):
    """A residual network with `lipschitz_bound(model) <= lipschitz` by construction.

    Depth 6n + 2 as the CIFAR ResNets: a 3x3 stem conv, three stages of n
    blocks (width, 2 width, 4 width channels; stride 2 into stages 2 and 3),
    and a Dense classifier times `lipschitz`. A block
    is Average(skip, branch) with branch = activation, 3x3 conv, activation,
    3x3 conv; where the shape changes the skip is a strided 1x1 conv. The
    last stage's output is flattened (not pooled) into the classifier.

    Args:
      depth: 6n + 2 (8, 14, 20, 32, ...).
      width: channels of the first stage.
      Others: as for `lipschitz_convnet`.
    """
    input_shape, lipschitz = _check(input_shape, num_classes, lipschitz, activation)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"`depth` must be 6n + 2 with n >= 1 (8, 14, 20, ...); received "
                         f"depth={depth!r}.")
    blocks = (depth - 2) // 6
    inputs = keras.Input(input_shape, name="images")
    x = keras.layers.Conv2D(width, 3, padding="same", name="stem")(inputs)
    for stage, (filters, stride) in enumerate(zip((width, 2 * width, 4 * width), (1, 2, 2))):
        for block in range(blocks):
            prefix = f"stage{stage + 1}_block{block + 1}"
            strides = stride if block == 0 else 1
            skip = x
            if strides != 1 or x.shape[-1] != filters:
                skip = keras.layers.Conv2D(filters, 1, strides=strides, name=f"{prefix}_skip")(x)
            y = _activation(activation, f"{prefix}_a")(x)
            y = keras.layers.Conv2D(filters, 3, strides=strides, padding="same",
                                    name=f"{prefix}_conv_a")(y)
            y = _activation(activation, f"{prefix}_b")(y)
            y = keras.layers.Conv2D(filters, 3, padding="same", name=f"{prefix}_conv_b")(y)
            x = keras.layers.Average(name=f"{prefix}_mean")([skip, y])
    x = _activation(activation, "final")(x)
    # Flatten, not global average pooling: averaging P positions is
    # 1/sqrt(P)-Lipschitz but shrinks the class signal by up to 1/P, which a
    # norm-bounded network cannot win back (measured: 18% on digits).
    x = keras.layers.Flatten(name="flatten")(x)
    model = keras.Model(inputs, _head(x, num_classes, lipschitz, "head"),
                        name=name or f"lipschitz_resnet{depth}")
    return _finish(model, lipschitz, _certified_method(method))
