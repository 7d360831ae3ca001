"""Pre-activation ResNet (ResNet V2) for CIFAR-sized images.

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks" (2016), laid
out like the TF Model Garden CIFAR-10 ResNet (`official/r1/resnet`), so that
its recipe and reported numbers carry over:

* a 3x3 stem conv (16 filters, no BN/ReLU: the first block pre-activates it);
* three stages of n blocks with 16/32/64 filters (x4 outputs for bottleneck
  blocks), the first block of stages 2 and 3 with stride 2;
* each block starts with BN-ReLU; the first block of every stage (stage 1
  included) takes a 1x1 projection shortcut from that pre-activated input;
* final BN-ReLU, global average pooling and a dense layer giving logits.

Depth 6n+2 uses basic blocks (two 3x3 convs): ResNet-20/32/56/110.
Depth 9n+2 uses bottleneck blocks (1x1, 3x3, 1x1): ResNet-164/1001.

The model knows nothing of operator norms: constraints or clipping are
attached afterwards (`tfconvnorm.constrain(model, ...)` or the
`tfconvnorm.OperatorNormClipper` callback). Every layer has an explicit,
build-independent name, so the variable structure (and therefore
`tf.train.Checkpoint(model=model)` files) is the same on every build.
"""

import keras

from tfconvnorm.spectral.arguments import check_positive_int

STAGE_FILTERS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
BOTTLENECK_EXPANSION = 4
# Depths >= this that are 9n+2 default to bottleneck blocks (164 is both 6n+2
# and 9n+2; He et al.'s ResNet-164 is the bottleneck one).
_BOTTLENECK_MIN_DEPTH = 164
# Keras' BN defaults; the Model Garden uses momentum 0.997, which needs
# thousands of steps before the moving statistics are usable.
DEFAULT_BN_MOMENTUM = 0.99
DEFAULT_BN_EPSILON = 1e-5
BLOCK_TYPES = ("basic", "bottleneck")


def resnet_v2_block_config(depth, block_type=None):
    """Returns `(block_type, blocks_per_stage)` for a CIFAR ResNet V2 depth.

    Args:
      depth: total number of weight layers, 6n+2 (basic) or 9n+2 (bottleneck).
      block_type: "basic", "bottleneck", or None to choose from the depth:
        bottleneck when depth is 9n+2 and either >= 164 or not 6n+2.

    Raises:
      ValueError: when `depth` fits neither form (or not the requested one).
    """
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise ValueError(f"depth must be an int, got {depth!r}")
    if block_type not in (None,) + BLOCK_TYPES:
        raise ValueError(f"block_type must be one of {BLOCK_TYPES} or None, got {block_type!r}")
    basic_ok = depth >= 8 and (depth - 2) % 6 == 0
    bottleneck_ok = depth >= 11 and (depth - 2) % 9 == 0
    if block_type is None:
        if bottleneck_ok and (depth >= _BOTTLENECK_MIN_DEPTH or not basic_ok):
            block_type = "bottleneck"
        elif basic_ok:
            block_type = "basic"
    if block_type == "basic" and basic_ok:
        return "basic", (depth - 2) // 6
    if block_type == "bottleneck" and bottleneck_ok:
        return "bottleneck", (depth - 2) // 9
    raise ValueError(
        f"depth must be 6n+2 (basic blocks: 20, 32, 56, 110) or 9n+2 (bottleneck "
        f"blocks: 164, 1001) with n >= 1, got depth={depth!r}"
        + (f" for block_type={block_type!r}" if block_type else ""))


def cifar_resnet_v2(depth, num_classes=10, input_shape=(32, 32, 3), weight_decay=0.0,
                    block_type=None, batch_norm_momentum=DEFAULT_BN_MOMENTUM,
                    name=None):
    """Builds a CIFAR ResNet V2 (pre-activation) Keras model that outputs logits.

    Args:
      depth: 6n+2 for basic blocks (20, 32, 56, 110) or 9n+2 for bottleneck
        blocks (164, 1001); see `resnet_v2_block_config`.
      num_classes: size of the logits.
      input_shape: (height, width, channels) of the images.
      weight_decay: L2 weight decay in the `tf.nn.l2_loss` sense, i.e. the loss
        gains `weight_decay * sum(w**2) / 2` (the Model Garden's convention;
        Keras' `L2(l)` adds `l * sum(w**2)`, so this is `L2(weight_decay / 2)`),
        on every conv and dense weight; BN parameters are not decayed.
      block_type: None (from the depth), "basic" or "bottleneck".
      batch_norm_momentum: momentum of the BN moving statistics.
      name: model name; defaults to "resnet{depth}_v2".

    Returns:
      An uncompiled `keras.Model`.

    Raises:
      ValueError: for a depth of neither form, or bad num_classes/input_shape/
        weight_decay.
    """
    block_type, blocks_per_stage = resnet_v2_block_config(depth, block_type)
    num_classes = check_positive_int(num_classes, "num_classes")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints, "
                         f"got {input_shape!r}")
    if not weight_decay >= 0:  # also rejects NaN
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")

    regularizer = keras.regularizers.L2(weight_decay / 2.0) if weight_decay else None

    def conv(x, filters, kernel_size, strides, layer_name):
        return keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding="same", use_bias=False,
            kernel_initializer="he_normal", kernel_regularizer=regularizer,
            name=layer_name)(x)

    def bn_relu(x, prefix):
        x = keras.layers.BatchNormalization(
            momentum=batch_norm_momentum, epsilon=DEFAULT_BN_EPSILON, name=prefix + "_bn")(x)
        return keras.layers.Activation("relu", name=prefix + "_relu")(x)

    inputs = keras.Input(shape=input_shape, name="image")
    x = conv(inputs, STAGE_FILTERS[0], 3, 1, "stem_conv")
    for stage, (filters, stage_stride) in enumerate(zip(STAGE_FILTERS, STAGE_STRIDES), 1):
        out_filters = filters * BOTTLENECK_EXPANSION if block_type == "bottleneck" else filters
        for block in range(1, blocks_per_stage + 1):
            prefix = f"stage{stage}_block{block}"
            first = block == 1
            strides = stage_stride if first else 1
            shortcut = x
            x = bn_relu(x, prefix + "_preact")
            if first:
                # Projection from the pre-activated input, as in the Model Garden.
                shortcut = conv(x, out_filters, 1, strides, prefix + "_shortcut")
            if block_type == "basic":
                x = conv(x, filters, 3, strides, prefix + "_conv1")
                x = bn_relu(x, prefix + "_conv1")
                x = conv(x, filters, 3, 1, prefix + "_conv2")
            else:
                x = conv(x, filters, 1, 1, prefix + "_conv1")
                x = bn_relu(x, prefix + "_conv1")
                x = conv(x, filters, 3, strides, prefix + "_conv2")
                x = bn_relu(x, prefix + "_conv2")
                x = conv(x, out_filters, 1, 1, prefix + "_conv3")
            x = keras.layers.Add(name=prefix + "_add")([shortcut, x])
    x = bn_relu(x, "final")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # Logits in float32 even under a mixed-precision policy, for a stable loss.
    mixed = keras.mixed_precision.global_policy().name.startswith("mixed")
    logits = keras.layers.Dense(
        num_classes, kernel_regularizer=regularizer,
        bias_regularizer=regularizer, dtype="float32" if mixed else None, name="logits")(x)
    return keras.Model(inputs, logits, name=name or f"resnet{depth}_v2")
