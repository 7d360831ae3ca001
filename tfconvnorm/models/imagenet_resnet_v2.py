"""ImageNet ResNet V2 (ResNet50V2 / 101V2 / 152V2): depths, names and the Keras model.

`keras.applications.ResNet{50,101,152}V2` has the layout of TF-slim's
`resnet_v2_{50,101,152}` (pre-activation bottleneck units, the stride on the
3x3 conv of the last unit of blocks 1-3), so one Keras model gives the
geometry of both; the name map between them lives with the slim reader
(`tfconvnorm.checkpoints.slim`), the layer names of weight files with theirs
(`tfconvnorm.checkpoints.keras_weights`).
"""

import re

import keras

# Bottleneck units per block (Keras: per stage conv2..conv5).
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
DEPTHS = tuple(sorted(STAGE_BLOCKS))
DEFAULT_IMAGE_SIZE = 224
# keras.applications refuses smaller inputs.
MIN_IMAGE_SIZE = 32
KERAS_NUM_CLASSES = 1000

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
