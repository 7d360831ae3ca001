"""ImageNet ResNet V2 (ResNet50V2 / 101V2 / 152V2) and its TF-slim variable names.

`keras.applications.ResNet{50,101,152}V2` has the layout of TF-slim's
`resnet_v2_{50,101,152}` (pre-activation bottleneck units, the stride on the
3x3 conv of the last unit of blocks 1-3), so one Keras model gives the
geometry of both, and a name map lets `tfconvnorm.checkpoints` read slim
checkpoints against it:

    conv1_conv/kernel                  <-> resnet_v2_50/conv1/weights
    conv{S}_block{K}_preact_bn/gamma   <-> resnet_v2_50/block{S-1}/unit_{K}/bottleneck_v2/preact/gamma
    conv{S}_block{K}_0_conv/kernel     <-> .../unit_{K}/bottleneck_v2/shortcut/weights
    conv{S}_block{K}_{1,2,3}_conv/...  <-> .../unit_{K}/bottleneck_v2/conv{1,2,3}/{weights,biases}
    conv{S}_block{K}_{1,2}_bn/beta     <-> .../unit_{K}/bottleneck_v2/conv{1,2}/BatchNorm/beta
    post_bn/...                        <-> resnet_v2_50/postnorm/...
    predictions/kernel                 <-> resnet_v2_50/logits/weights

Slim's logits are a 1x1 conv with 1001 classes (class 0 is "background");
Keras' are a Dense layer with 1000.
"""

import re

import keras

from tfconvnorm import geometry as geometry_lib

# Bottleneck units per block (Keras: per stage conv2..conv5).
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
DEPTHS = tuple(sorted(STAGE_BLOCKS))
DEFAULT_IMAGE_SIZE = 224
# keras.applications refuses smaller inputs.
MIN_IMAGE_SIZE = 32
KERAS_NUM_CLASSES = 1000
_KERAS_FIRST_STAGE = 2  # Keras stage conv2 is slim block1.

_BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
_CONV_TO_SLIM = {"kernel": "weights", "bias": "biases"}
_SLIM_TO_CONV = {v: k for k, v in _CONV_TO_SLIM.items()}
_UNIT_CONVS = {"0": "shortcut", "1": "conv1", "2": "conv2", "3": "conv3"}
_SLIM_UNIT_CONVS = {v: k for k, v in _UNIT_CONVS.items()}

_NAME_PATTERNS = (
    re.compile(r"^resnet[_-]?v2[_-]?(\d+)$"),   # resnet_v2_50 (slim), resnetv2-50
    re.compile(r"^resnet[_-]?(\d+)[_-]?v2$"),   # resnet50v2, ResNet50V2 (Keras)
    re.compile(r"^(\d+)$"),
)


def parse_depth(depth_or_name):
    """Returns 50, 101 or 152 from a depth or an architecture name.

    Accepts ints and the Keras (`"resnet50v2"`, `"ResNet50V2"`) and slim
    (`"resnet_v2_50"`) spellings.
    """
    if isinstance(depth_or_name, bool):
        depth = None
    elif isinstance(depth_or_name, int):
        depth = depth_or_name
    elif isinstance(depth_or_name, str):
        depth = None
        for pattern in _NAME_PATTERNS:
            match = pattern.match(depth_or_name.strip().lower())
            if match:
                depth = int(match.group(1))
                break
    else:
        depth = None
    if depth not in STAGE_BLOCKS:
        raise ValueError(
            f"depth_or_name must name an ImageNet ResNet V2 of depth {DEPTHS} "
            f"(e.g. 50, 'resnet50v2', 'ResNet50V2', 'resnet_v2_50'), got {depth_or_name!r}")
    return depth


def slim_scope(depth_or_name):
    """The slim variable scope, e.g. "resnet_v2_50"."""
    return f"resnet_v2_{parse_depth(depth_or_name)}"


def build_resnet_v2(depth_or_name, image_size=DEFAULT_IMAGE_SIZE, weights=None,
                    include_top=True, classes=KERAS_NUM_CLASSES):
    """Builds `keras.applications.ResNet{50,101,152}V2` for square inputs.

    Args:
      depth_or_name: 50/101/152 or a name `parse_depth` accepts.
      image_size: input height and width (>= 32); the layers' input sizes,
        and so their spectra, follow from it.
      weights: None (random), "imagenet" (downloads) or a weights file path.
      include_top: whether to keep the pooling + Dense classifier.
      classes: classifier size when `include_top`.

    Raises:
      ValueError: an unknown depth or a bad image size.
    """
    depth = parse_depth(depth_or_name)
    if (isinstance(image_size, bool) or not isinstance(image_size, int)
            or image_size < MIN_IMAGE_SIZE):
        raise ValueError(f"image_size must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    constructor = getattr(keras.applications, f"ResNet{depth}V2")
    return constructor(weights=weights, input_shape=(image_size, image_size, 3),
                       include_top=include_top, classes=classes)


def _check_block(depth, stage, block, name):
    blocks = STAGE_BLOCKS[depth]
    index = stage - _KERAS_FIRST_STAGE
    if not (0 <= index < len(blocks) and 1 <= block <= blocks[index]):
        raise ValueError(f"{name!r} has no counterpart in ResNet{depth}V2 "
                         f"(stages conv2..conv5 with {blocks} blocks)")


def keras_to_slim(layer_name, depth):
    """Maps a Keras ResNet V2 name to its TF-slim name.

    Args:
      layer_name: a variable path (`"conv2_block1_1_conv/kernel"`: returns the
        slim variable name) or a layer name (`"conv2_block1_1_conv"`: returns
        the slim scope of that layer, e.g. `.../unit_1/bottleneck_v2/conv1`).
      depth: 50/101/152 or a name `parse_depth` accepts.

    Raises:
      ValueError: a name that is not a weight layer / variable of that model.
    """
    depth = parse_depth(depth)
    scope = f"resnet_v2_{depth}"
    layer, _, variable = str(layer_name).partition("/")

    def fail():
        return ValueError(f"layer_name {layer_name!r} is not a weight layer or variable "
                          f"of keras.applications.ResNet{depth}V2")

    if layer == "conv1_conv":
        layer_scope, kind = f"{scope}/conv1", "conv"
    elif layer == "post_bn":
        layer_scope, kind = f"{scope}/postnorm", "bn"
    elif layer == "predictions":
        layer_scope, kind = f"{scope}/logits", "conv"
    else:
        match = re.match(r"^conv(\d)_block(\d+)_(preact_bn|[0-3]_conv|[12]_bn)$", layer)
        if not match:
            raise fail()
        stage, block, part = int(match.group(1)), int(match.group(2)), match.group(3)
        _check_block(depth, stage, block, layer_name)
        unit = f"{scope}/block{stage - 1}/unit_{block}/bottleneck_v2"
        if part == "preact_bn":
            layer_scope, kind = f"{unit}/preact", "bn"
        elif part.endswith("_conv"):
            layer_scope, kind = f"{unit}/{_UNIT_CONVS[part[0]]}", "conv"
        else:
            layer_scope, kind = f"{unit}/conv{part[0]}/BatchNorm", "bn"
    if not variable:
        return layer_scope
    if kind == "bn" and variable in _BN_VARIABLES:
        return f"{layer_scope}/{variable}"
    if kind == "conv" and variable in _CONV_TO_SLIM:
        return f"{layer_scope}/{_CONV_TO_SLIM[variable]}"
    raise fail()


def slim_to_keras(var_name):
    """Maps a TF-slim ResNet V2 variable name to the Keras variable path.

    Raises:
      ValueError: a name with no Keras counterpart (`global_step`, optimizer
        slots, or not a ResNet V2 weight).
    """
    def fail():
        return ValueError(f"var_name {var_name!r} is not a TF-slim resnet_v2_{{50,101,152}} "
                          "weight with a Keras counterpart")

    match = re.match(r"^resnet_v2_(\d+)/(.+)$", str(var_name))
    if not match or int(match.group(1)) not in STAGE_BLOCKS:
        raise fail()
    depth, rest = int(match.group(1)), match.group(2)
    simple = {"conv1": "conv1_conv", "logits": "predictions", "postnorm": "post_bn"}
    head, _, variable = rest.rpartition("/")
    if head in ("conv1", "logits") and variable in _SLIM_TO_CONV:
        return f"{simple[head]}/{_SLIM_TO_CONV[variable]}"
    if head == "postnorm" and variable in _BN_VARIABLES:
        return f"post_bn/{variable}"
    match = re.match(r"^block(\d)/unit_(\d+)/bottleneck_v2/(preact|shortcut|conv[123])"
                     r"(/BatchNorm)?$", head)
    if not match:
        raise fail()
    stage, block = int(match.group(1)) + 1, int(match.group(2))
    part, batch_norm = match.group(3), bool(match.group(4))
    try:
        _check_block(depth, stage, block, var_name)
    except ValueError:
        raise fail() from None
    prefix = f"conv{stage}_block{block}"
    if part == "preact" and not batch_norm and variable in _BN_VARIABLES:
        return f"{prefix}_preact_bn/{variable}"
    if part in ("conv1", "conv2") and batch_norm and variable in _BN_VARIABLES:
        return f"{prefix}_{part[-1]}_bn/{variable}"
    if part != "preact" and not batch_norm and variable in _SLIM_TO_CONV:
        return f"{prefix}_{_SLIM_UNIT_CONVS[part]}_conv/{_SLIM_TO_CONV[variable]}"
    raise fail()


def slim_value_to_keras(var_name, value):
    """Converts a slim variable's value to the layout of its Keras variable.

    Only the logits differ: slim's `(1, 1, 2048, 1001)` 1x1 conv (class 0 is
    "background") becomes Keras' `(2048, 1000)` Dense kernel.
    """
    if str(var_name).endswith("/logits/weights"):
        return value.reshape(value.shape[-2], value.shape[-1])[:, 1:]
    if str(var_name).endswith("/logits/biases"):
        return value[1:]
    return value


def depth_from_weight_names(names):
    """The depth of a ResNet V2 whose Keras weights file holds these layer names, or None.

    Legacy `.h5` files (`keras.applications`' downloads) name layers
    (`conv4_block23_1_conv`: conv4 has 6/23/36 blocks); Keras 3 `.weights.h5`
    files number them by class (`conv2d_103`: 53/104/155 convs).
    """
    names = list(names)
    conv4_blocks = {int(m.group(1)) for m in map(re.compile(r"^conv4_block(\d+)_").match, names)
                    if m}
    for depth, blocks in STAGE_BLOCKS.items():
        if conv4_blocks and max(conv4_blocks) == blocks[2]:
            return depth
    convs = sum(1 for n in names if re.match(r"^conv2d(_\d+)?$", n))
    for depth, blocks in STAGE_BLOCKS.items():
        if convs and convs == 3 * sum(blocks) + len(blocks) + 1:
            return depth
    return None


def has_classifier(names):
    """Whether a Keras weights file with these layer names includes the classifier."""
    return any(n == "predictions" or re.match(r"^dense(_\d+)?$", n) for n in names)


def resnet_v2_layer_set(depth_or_name=50, image_size=DEFAULT_IMAGE_SIZE, include_dense=False,
                        boundary=geometry_lib.BOUNDARY_LAYER):
    """The linear operators of an ImageNet ResNet V2 as `(name, kernel_shape, geometry)`.

    `name` is the Keras kernel path (`"conv2_block1_2_conv/kernel"`),
    `kernel_shape` the shape in the spectral core's layout and `geometry` a
    `tfconvnorm.geometry.ConvGeometry`: `conv_singular_values(kernel,
    **geometry.spectral_kwargs())` gives a layer's spectrum. Convs only unless
    `include_dense` (53 convs for ResNet50V2). `boundary`: as for
    `tfconvnorm.model_geometry`; with "circular", where a stride does not
    divide an input size (e.g. at 299) the layer's geometry uses the next
    size it divides and is marked `approximate`.
    """
    model = build_resnet_v2(depth_or_name, image_size)
    return [(op.name, tuple(op.geometry.kernel_shape), op.geometry)
            for op in geometry_lib.model_geometry(model, round_up=True, boundary=boundary)
            if include_dense or op.geometry.kind != "dense"]


def resnet50v2_layer_set(image_size=DEFAULT_IMAGE_SIZE):
    """The 53 convs of ResNet50V2 (1x1 included) at `image_size`; see `resnet_v2_layer_set`."""
    return resnet_v2_layer_set(50, image_size)
