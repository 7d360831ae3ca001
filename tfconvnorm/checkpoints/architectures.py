"""The architectures that readers without a model of their own rebuild.

`tfconvnorm.models` is imported only when one is built: importing the
package stays light.

TF2 checkpoints of `train`, TF-slim ResNet V2 checkpoints and Keras weight
files hold values, not an architecture. The CIFAR ResNet V2 is rebuilt from
the run's `config.json` (next to or above the checkpoint), the ImageNet
ResNet V2s from their depth; the readers check every variable against it.
"""

import os

from tfconvnorm import files
from tfconvnorm import geometry as geometry_lib

CIFAR_ARCHITECTURE = "cifar_resnet_v2"
IMAGENET_ARCHITECTURES = ("resnet50v2", "resnet101v2", "resnet152v2",
                          "resnet_v2_50", "resnet_v2_101", "resnet_v2_152")
ARCHITECTURES = (CIFAR_ARCHITECTURE,) + IMAGENET_ARCHITECTURES
DEFAULT_IMAGENET_SIZE = 224
DEFAULT_CIFAR_SIZE = 32
DEFAULT_CIFAR_CLASSES = 10


def architecture_family(architecture, depth):
    """`(family, depth)`: family "cifar" or "imagenet"."""
    if architecture is None:
        return None, depth
    name = str(architecture).lower()
    if name == CIFAR_ARCHITECTURE:
        return "cifar", depth
    if name in IMAGENET_ARCHITECTURES:
        from tfconvnorm.models import imagenet_resnet_v2  # pylint: disable=import-outside-toplevel
        return "imagenet", imagenet_resnet_v2.parse_depth(name)
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def find_run_config(checkpoint, prefix=None):
    """train.py's config.json: in the model_dir given, or next to / above the checkpoint."""
    candidates = []
    if os.path.isdir(checkpoint):
        candidates.append(checkpoint)
    for path in filter(None, (prefix, checkpoint)):
        directory = os.path.dirname(os.path.abspath(path))
        candidates += [directory, os.path.dirname(directory)]
    for directory in candidates:
        path = os.path.join(directory, files.RUN_CONFIG_FILE)
        if os.path.isfile(path):
            return files.read_json(path), path
    return {}, None


def config_value(config, *keys):
    """First of `keys` found in `config` or one level down (train.py may nest)."""
    for key in keys:
        if key in config:
            return config[key]
    for value in config.values():
        if isinstance(value, dict):
            found = config_value(value, *keys)
            if found is not None:
                return found
    return None


def build_cifar(depth, image_size, config, config_path):
    depth = depth or config_value(config, "depth")
    if depth is None:
        raise ValueError(f"--depth is needed for {CIFAR_ARCHITECTURE} (no {files.RUN_CONFIG_FILE} "
                         "next to the checkpoint)")
    num_classes = config_value(config, "num_classes") or DEFAULT_CIFAR_CLASSES
    input_shape = config_value(config, "input_shape")
    if image_size is not None or input_shape is None:
        size = image_size or DEFAULT_CIFAR_SIZE
        channels = input_shape[-1] if input_shape else 3
        input_shape = (size, size, channels)
    kwargs = {}
    block_type = config_value(config, "block_type")
    if block_type:
        kwargs["block_type"] = block_type
    source = f" ({config_path})" if config_path else ""
    input_shape = tuple(int(d) for d in input_shape)
    lipschitz = config_value(config, "lipschitz")
    if lipschitz is not None:
        # A run of train.py's Lipschitz mode: the network it built.
        from tfconvnorm.models import lipschitz_nets  # pylint: disable=import-outside-toplevel
        activation = config_value(config, "lipschitz_activation") or "maxmin"
        model = lipschitz_nets.lipschitz_resnet(input_shape, int(num_classes), int(depth),
                                                lipschitz=float(lipschitz), activation=activation)
        return model, (f"lipschitz_resnet depth {depth} ({activation}, L = {lipschitz:g}), "
                       f"input {input_shape}{source}")
    from tfconvnorm.models import resnet_v2  # pylint: disable=import-outside-toplevel
    model = resnet_v2.cifar_resnet_v2(int(depth), num_classes=int(num_classes),
                                      input_shape=input_shape, **kwargs)
    return model, f"{CIFAR_ARCHITECTURE} depth {depth}, input {input_shape}{source}"


def build_imagenet(depth, image_size, include_top=True):
    size = image_size or DEFAULT_IMAGENET_SIZE
    from tfconvnorm.models import imagenet_resnet_v2  # pylint: disable=import-outside-toplevel
    model = imagenet_resnet_v2.build_resnet_v2(depth, size, include_top=include_top)
    top = "" if include_top else ", no classifier"
    return model, f"ResNet{depth}V2 at {size}x{size}{top}"


def resnet_v2_layer_set(depth_or_name=50, image_size=DEFAULT_IMAGENET_SIZE, include_dense=False,
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
    from tfconvnorm.models import imagenet_resnet_v2  # pylint: disable=import-outside-toplevel
    model = imagenet_resnet_v2.build_resnet_v2(depth_or_name, image_size)
    return [(op.name, tuple(op.geometry.kernel_shape), op.geometry)
            for op in geometry_lib.model_geometry(model, round_up=True, boundary=boundary)
            if include_dense or op.geometry.kind != "dense"]


def resnet50v2_layer_set(image_size=DEFAULT_IMAGENET_SIZE):
    """The 53 convs of ResNet50V2 (1x1 included) at `image_size`; see `resnet_v2_layer_set`."""
    return resnet_v2_layer_set(50, image_size)
