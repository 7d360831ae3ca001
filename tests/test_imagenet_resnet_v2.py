"""Tests of models/imagenet_resnet_v2.py (building, depths) and of what the readers
keep of it: the slim name map (checkpoints/slim.py), weight-file layer names
(checkpoints/keras_weights.py) and layer sets (checkpoints/architectures.py)."""

import numpy as np
import pytest

from tfconvnorm.checkpoints import architectures, keras_weights
from tfconvnorm.checkpoints import slim as slim_names
from tfconvnorm.models import imagenet_resnet_v2 as irv2


@pytest.mark.parametrize("name,depth", [
    (50, 50), ("50", 50), ("resnet50v2", 50), ("ResNet101V2", 101), ("resnet_v2_152", 152),
    ("RESNET_V2_101", 101)])
def test_parse_depth(name, depth):
    assert irv2.parse_depth(name) == depth


@pytest.mark.parametrize("bad", [34, "resnet50", "resnet_v1_50", True, None, 50.0])
def test_parse_depth_rejects(bad):
    with pytest.raises(ValueError, match="depth_or_name"):
        irv2.parse_depth(bad)


def test_build_rejects_small_image():
    with pytest.raises(ValueError, match="image_size"):
        irv2.build_resnet_v2(50, image_size=16)


@pytest.fixture(scope="module")
def resnet50_small():
    return irv2.build_resnet_v2("resnet50v2", image_size=32)


def test_name_map_round_trips_every_variable(resnet50_small):
    paths = [v.path for v in resnet50_small.weights]
    slim = [slim_names.keras_to_slim(p, 50) for p in paths]
    assert len(set(slim)) == len(slim) == len(paths)
    assert [slim_names.slim_to_keras(s) for s in slim] == paths
    assert all(s.startswith("resnet_v2_50/") for s in slim)


@pytest.mark.parametrize("keras_name,slim_name", [
    ("conv1_conv/kernel", "resnet_v2_50/conv1/weights"),
    ("conv1_conv/bias", "resnet_v2_50/conv1/biases"),
    ("conv2_block1_preact_bn/gamma", "resnet_v2_50/block1/unit_1/bottleneck_v2/preact/gamma"),
    ("conv2_block3_2_conv/kernel", "resnet_v2_50/block1/unit_3/bottleneck_v2/conv2/weights"),
    ("conv5_block1_0_conv/bias", "resnet_v2_50/block4/unit_1/bottleneck_v2/shortcut/biases"),
    ("conv3_block2_1_bn/moving_mean",
     "resnet_v2_50/block2/unit_2/bottleneck_v2/conv1/BatchNorm/moving_mean"),
    ("conv4_block6_3_conv/kernel", "resnet_v2_50/block3/unit_6/bottleneck_v2/conv3/weights"),
    ("post_bn/beta", "resnet_v2_50/postnorm/beta"),
    ("predictions/kernel", "resnet_v2_50/logits/weights"),
    ("conv3_block4_2_conv", "resnet_v2_50/block2/unit_4/bottleneck_v2/conv2"),
])
def test_known_names(keras_name, slim_name):
    assert slim_names.keras_to_slim(keras_name, "resnet_v2_50") == slim_name
    if "/" in keras_name:
        assert slim_names.slim_to_keras(slim_name) == keras_name


def test_name_map_respects_depth():
    # conv4 has 6 blocks in ResNet50V2 and 23 in ResNet101V2.
    with pytest.raises(ValueError, match="conv4_block7_1_conv"):
        slim_names.keras_to_slim("conv4_block7_1_conv/kernel", 50)
    assert slim_names.keras_to_slim("conv4_block7_1_conv/kernel", 101) == (
        "resnet_v2_101/block3/unit_7/bottleneck_v2/conv1/weights")
    with pytest.raises(ValueError, match="var_name"):
        slim_names.slim_to_keras("resnet_v2_50/block3/unit_7/bottleneck_v2/conv1/weights")


@pytest.mark.parametrize("bad", ["global_step", "resnet_v2_50/conv1/weights/Momentum",
                                 "resnet_v2_50/block1/unit_1/bottleneck_v2/preact/weights",
                                 "resnet_v1_50/conv1/weights"])
def test_slim_to_keras_rejects(bad):
    with pytest.raises(ValueError, match="var_name"):
        slim_names.slim_to_keras(bad)


def test_keras_to_slim_rejects():
    with pytest.raises(ValueError, match="layer_name"):
        slim_names.keras_to_slim("conv2_block1_2_bn/kernel", 50)
    with pytest.raises(ValueError, match="layer_name"):
        slim_names.keras_to_slim("avg_pool", 50)


def test_slim_logits_drop_background_class():
    weights = np.arange(2 * 5, dtype=np.float32).reshape(1, 1, 2, 5)
    converted = slim_names.slim_value_to_keras("resnet_v2_50/logits/weights", weights)
    np.testing.assert_array_equal(converted, weights[0, 0, :, 1:])
    biases = np.arange(5.0)
    np.testing.assert_array_equal(
        slim_names.slim_value_to_keras("resnet_v2_50/logits/biases", biases), biases[1:])
    kernel = np.ones((3, 3, 2, 2))
    assert slim_names.slim_value_to_keras("resnet_v2_50/conv1/weights", kernel) is kernel


def test_layer_set_at_224():
    layers = architectures.resnet50v2_layer_set(224)
    assert len(layers) == 53
    by_name = {name: geometry for name, _, geometry in layers}
    strided = sorted(name for name, g in by_name.items() if g.strides != (1, 1))
    assert strided == ["conv1_conv/kernel", "conv2_block3_2_conv/kernel",
                       "conv3_block4_2_conv/kernel", "conv4_block6_2_conv/kernel"]
    # Keras pads explicitly, so the convs see the padded sizes.
    assert by_name["conv1_conv/kernel"].input_shape == (230, 230)
    assert by_name["conv2_block1_2_conv/kernel"].input_shape == (58, 58)
    assert by_name["conv3_block1_2_conv/kernel"].input_shape == (30, 30)
    assert by_name["conv4_block1_2_conv/kernel"].input_shape == (16, 16)
    assert by_name["conv5_block1_2_conv/kernel"].input_shape == (9, 9)
    assert by_name["conv5_block3_3_conv/kernel"].input_shape == (7, 7)
    assert not any(g.approximate for g in by_name.values())
    assert sum(1 for _, shape, _ in layers if shape[:2] == (1, 1)) == 36
    for _, shape, geometry in layers:
        assert shape == geometry.kernel_shape


def test_layer_set_at_299_embeds_odd_sizes_or_marks_circular_approximations():
    layers = architectures.resnet_v2_layer_set("resnet_v2_50", 299, include_dense=True)
    assert len(layers) == 54 and layers[-1][2].kind == "dense"
    # Their own 'valid' padding: nothing approximate; 305, 77 and 21 are odd,
    # so the stride-2 convs there embed into the next even circular size.
    assert not any(g.approximate for _, _, g in layers)
    odd = {name: (g.input_shape, g.embedding_shape) for name, _, g in layers
           if g.input_shape != g.embedding_shape}
    assert odd == {"conv1_conv/kernel": ((305, 305), (306, 306)),
                   "conv2_block3_2_conv/kernel": ((77, 77), (78, 78)),
                   "conv4_block6_2_conv/kernel": ((21, 21), (22, 22))}
    circular = architectures.resnet_v2_layer_set("resnet_v2_50", 299, boundary="circular")
    approximate = {name: g.input_shape for name, _, g in circular if g.approximate}
    assert approximate == {"conv1_conv/kernel": (306, 306),
                           "conv2_block3_2_conv/kernel": (78, 78),
                           "conv4_block6_2_conv/kernel": (22, 22)}


def test_depth_from_weight_names():
    legacy_101 = ["conv1_conv"] + [f"conv4_block{k}_1_conv" for k in range(1, 24)]
    assert keras_weights.depth_from_weight_names(legacy_101) == 101
    keras3_152 = ["conv2d"] + [f"conv2d_{i}" for i in range(1, 155)] + ["dense"]
    assert keras_weights.depth_from_weight_names(keras3_152) == 152
    assert keras_weights.depth_from_weight_names(["conv2d", "dense"]) is None
    assert keras_weights.has_classifier(keras3_152)
    assert not keras_weights.has_classifier(legacy_101)
