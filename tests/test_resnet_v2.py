"""Tests for models/resnet_v2.py: the CIFAR pre-activation ResNet."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfconvnorm.models import resnet_v2


def _basic_param_count(depth, num_classes=10, channels=3):
    """Independent count for basic blocks: conv weights + 4 BN numbers per channel."""
    n = (depth - 2) // 6
    total = 9 * channels * 16  # stem
    in_c = 16
    for filters in (16, 32, 64):
        for block in range(n):
            total += 4 * in_c  # pre-activation BN
            if block == 0:
                total += in_c * filters  # 1x1 projection shortcut
            total += 9 * in_c * filters + 4 * filters + 9 * filters * filters
            in_c = filters
    return total + 4 * 64 + 64 * num_classes + num_classes  # final BN, dense


def _bottleneck_param_count(depth, num_classes=10, channels=3):
    n = (depth - 2) // 9
    total = 9 * channels * 16
    in_c = 16
    for filters in (16, 32, 64):
        out = 4 * filters
        for block in range(n):
            total += 4 * in_c
            if block == 0:
                total += in_c * out
            total += in_c * filters + 4 * filters + 9 * filters * filters + 4 * filters
            total += filters * out
            in_c = out
    return total + 4 * 256 + 256 * num_classes + num_classes


# Pinned so that any change to the architecture is noticed (ResNet-32 V2: 0.47M).
PINNED_PARAMS = {20: 273_914, 32: 469_242, 56: 859_898, 110: 1_738_874, 164: 1_727_482}


@pytest.mark.parametrize("depth", sorted(PINNED_PARAMS))
def test_parameter_counts(depth):
    model = resnet_v2.cifar_resnet_v2(depth)
    block_type, _ = resnet_v2.resnet_v2_block_config(depth)
    expected = (_basic_param_count(depth) if block_type == "basic"
                else _bottleneck_param_count(depth))
    assert model.count_params() == expected == PINNED_PARAMS[depth]
    # Weight layers: stem + 2 (basic) or 3 (bottleneck) per block + dense = depth;
    # plus the three projection shortcuts.
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert len(convs) == depth + 2


def test_block_config():
    assert resnet_v2.resnet_v2_block_config(32) == ("basic", 5)
    assert resnet_v2.resnet_v2_block_config(8) == ("basic", 1)
    assert resnet_v2.resnet_v2_block_config(164) == ("bottleneck", 18)
    assert resnet_v2.resnet_v2_block_config(1001) == ("bottleneck", 111)
    assert resnet_v2.resnet_v2_block_config(11) == ("bottleneck", 1)
    assert resnet_v2.resnet_v2_block_config(164, "basic") == ("basic", 27)
    assert resnet_v2.resnet_v2_block_config(20, "bottleneck") == ("bottleneck", 2)


@pytest.mark.parametrize("depth", [21, 7, 2, 0, -4, 33, "32", 32.0, True])
def test_bad_depth_names_it(depth):
    with pytest.raises(ValueError, match=f"depth.*{depth!r}"):
        resnet_v2.cifar_resnet_v2(depth)


def test_bad_block_type_and_arguments():
    with pytest.raises(ValueError, match="depth=32 for block_type='bottleneck'"):
        resnet_v2.resnet_v2_block_config(32, "bottleneck")
    with pytest.raises(ValueError, match="block_type"):
        resnet_v2.cifar_resnet_v2(20, block_type="wide")
    with pytest.raises(ValueError, match="num_classes"):
        resnet_v2.cifar_resnet_v2(8, num_classes=0)
    with pytest.raises(ValueError, match="input_shape"):
        resnet_v2.cifar_resnet_v2(8, input_shape=(32, 32))
    with pytest.raises(ValueError, match="weight_decay"):
        resnet_v2.cifar_resnet_v2(8, weight_decay=-1.0)


@pytest.mark.parametrize("depth,widths", [(14, (16, 32, 64)), (11, (64, 128, 256))])
def test_stages_shapes_and_preactivation(depth, widths):
    model = resnet_v2.cifar_resnet_v2(depth, num_classes=7, input_shape=(32, 32, 1))
    _, n = resnet_v2.resnet_v2_block_config(depth)
    for stage, (size, width) in enumerate(zip((32, 16, 8), widths), 1):
        out = model.get_layer(f"stage{stage}_block{n}_add").output
        assert tuple(out.shape[1:]) == (size, size, width)
        # Projection shortcut on the first block of every stage, none later.
        shortcut = model.get_layer(f"stage{stage}_block1_shortcut")
        assert shortcut.kernel_size == (1, 1)
        assert shortcut.strides == ((1, 1) if stage == 1 else (2, 2))
        names = [l.name for l in model.layers]
        assert f"stage{stage}_block2_shortcut" not in names
        # Pre-activation: the block starts with BN whose input is the previous output.
        bn = model.get_layer(f"stage{stage}_block1_preact_bn")
        previous = "stem_conv" if stage == 1 else f"stage{stage - 1}_block{n}_add"
        assert bn.input is model.get_layer(previous).output
        assert model.get_layer(f"stage{stage}_block1_shortcut").input is (
            model.get_layer(f"stage{stage}_block1_preact_relu").output)
    assert model.get_layer("final_bn").input is model.get_layer(f"stage3_block{n}_add").output
    # Logits, not probabilities.
    x = np.random.RandomState(0).randn(4, 32, 32, 1).astype(np.float32)
    logits = model(x, training=False).numpy()
    assert logits.shape == (4, 7)
    assert not np.allclose(logits.sum(axis=1), 1.0)


def test_weight_decay_is_l2_loss_sense():
    decay = 3e-4
    model = resnet_v2.cifar_resnet_v2(8, weight_decay=decay)
    decayed = [w for w in model.weights if w.path.endswith(("kernel", "logits/bias"))]
    expected = decay * sum(float(tf.nn.l2_loss(w)) for w in decayed)
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-5)
    # BN parameters are not decayed.
    assert len(model.losses) == len(decayed)
    assert not resnet_v2.cifar_resnet_v2(8).losses


def test_deterministic_structure_and_checkpoint_round_trip(tmp_path):
    first = resnet_v2.cifar_resnet_v2(8, num_classes=10, input_shape=(32, 32, 3))
    second = resnet_v2.cifar_resnet_v2(8, num_classes=10, input_shape=(32, 32, 3))
    assert [v.path for v in first.weights] == [v.path for v in second.weights]
    path = tf.train.Checkpoint(model=first).save(str(tmp_path / "ckpt"))
    status = tf.train.Checkpoint(model=second).restore(path)
    status.assert_existing_objects_matched()
    x = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
    np.testing.assert_allclose(second(x, training=False), first(x, training=False), rtol=1e-6)


def test_logits_stay_float32_under_mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = resnet_v2.cifar_resnet_v2(8)
        assert model.get_layer("stem_conv").compute_dtype == "float16"
        assert model.get_layer("stem_conv").kernel.dtype == "float32"
        assert model.get_layer("logits").compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_geometry_sees_every_conv_with_its_input_size():
    import tfconvnorm.geometry as geometry  # pylint: disable=import-outside-toplevel
    model = resnet_v2.cifar_resnet_v2(8)
    ops = {op.layer.name: op.geometry for op in geometry.model_geometry(model)}
    assert len(ops) == 8 + 2 + 1  # convs + dense
    assert ops["stem_conv"].input_shape == (32, 32)
    assert ops["stage2_block1_conv1"].input_shape == (32, 32)
    assert ops["stage2_block1_conv1"].strides == (2, 2)
    assert ops["stage2_block1_conv2"].input_shape == (16, 16)
    assert ops["stage3_block1_shortcut"].input_shape == (16, 16)
    assert ops["stage3_block1_conv2"].input_shape == (8, 8)
    assert ops["logits"].kind == "dense"
