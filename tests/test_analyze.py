"""End-to-end tests of analyze.py: each input kind created locally and small.

For every kind the geometry in spectra.npz (input size, strides, padding,
embedding size N) is written out here by hand, and the spectra and norm
bounds are checked against explicit matrices: the spectrum equals the
circular operator's on N (cut to the layer's count), and it and the certified
interval bound the zero-padded layer's own matrix. Layers too large for an
explicit matrix are checked against `conv_singular_values` of the hand-written
geometry instead, so a wrong geometry anywhere in the chain fails.
"""

import csv
import os
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfconvnorm import analysis as analyze
from tfconvnorm.cli import analyze as analyze_cli
import tfconvnorm
from tfconvnorm import checkpoints
from tfconvnorm import reference

import oracles

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLIM_IMAGE_SIZE = 64


def load_npz(output_dir):
    with np.load(os.path.join(output_dir, "spectra.npz"), allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        return {name: {"sv": data[f"sv/{i}"], "strides": tuple(data[f"strides/{i}"]),
                       "input_shape": tuple(data[f"input_shape/{i}"]),
                       "embedding": tuple(data[f"embedding_shape/{i}"]),
                       "padding": str(data["padding"][i]),
                       "lower": float(data["sigma_max_lower"][i]),
                       "upper": float(data["sigma_max_upper"][i]),
                       "approximate": bool(data["approximate"][i])}
                for i, name in enumerate(names)}


# Explicit matrices up to this many entries (float64) are the oracle.
EXPLICIT_LIMIT = 20_000_000


def check_spectrum(entry, kernel, input_shape, strides=1, padding="same", embedding=None):
    """`entry` (from spectra.npz) against the layer's hand-written geometry."""
    kernel = np.asarray(kernel, np.float64)
    assert entry["input_shape"] == tuple(input_shape) and not entry["approximate"]
    assert entry["lower"] <= entry["upper"]
    if kernel.ndim == 2:  # Dense: the matrix itself
        np.testing.assert_allclose(entry["sv"], np.linalg.svd(kernel, compute_uv=False),
                                   rtol=1e-5)
        assert entry["lower"] <= np.linalg.norm(kernel, 2) <= entry["upper"]
        return
    assert entry["padding"] == padding and entry["embedding"] == tuple(embedding)
    rank = kernel.ndim - 2
    s = (strides,) * rank if isinstance(strides, int) else strides
    rows = np.prod(embedding) // np.prod(s) * kernel.shape[-1]
    if rows * np.prod(embedding) * kernel.shape[-2] > EXPLICIT_LIMIT:
        expected = tfconvnorm.conv_singular_values(
            kernel.astype(np.float32), input_shape, strides, padding=padding).numpy()
        np.testing.assert_array_equal(entry["sv"], expected)
        return
    circular = np.linalg.svd(reference.explicit_operator_matrix(kernel, embedding, strides),
                             compute_uv=False)
    layer = np.linalg.svd(reference.explicit_padded_operator_matrix(
        kernel, input_shape, strides, padding=padding), compute_uv=False)
    assert len(entry["sv"]) == len(layer)
    np.testing.assert_allclose(entry["sv"], circular[:len(layer)], rtol=1e-5,
                               atol=1e-6 * circular[0])
    assert np.all(layer <= entry["sv"] * (1 + 1e-5))
    assert entry["lower"] <= layer[0] <= entry["upper"]


def check_outputs(result, output_dir, layer_count):
    assert os.path.isfile(result["npz"]) and os.path.isfile(result["csv"])
    assert result["png"] and open(result["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with open(result["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == layer_count + 1 and rows[-1]["name"] == checkpoints.LIPSCHITZ_ROW_NAME
    bound = result["lipschitz_bound"]
    assert (rows[-1]["sigma_max_upper"] == "") == (bound is None)
    if bound is not None:
        assert float(rows[-1]["sigma_max_upper"]) == bound
    assert sorted(os.listdir(output_dir)) == ["spectra.npz", "spectra.png", "summary.csv"]


# ---------------------------------------------------------------------------
# .keras model file


def small_keras_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((15, 15, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv_a")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv_b")(x)  # 15: approx.
    x = keras.layers.Conv2D(5, 1, name="pointwise")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    model = small_keras_model()
    path = str(tmp_path_factory.mktemp("keras") / "small.keras")
    model.save(path)
    return path, {v.path: v.numpy() for v in model.weights}


def test_keras_model_file(keras_file, tmp_path, capsys):
    path, weights = keras_file
    result = analyze.analyse(path, str(tmp_path), skip_1x1=True)
    assert result["format"] == "keras"
    check_outputs(result, str(tmp_path), 4)
    spectra = load_npz(str(tmp_path))
    # 'same' on 15 pads (1, 1): N = 16; stride 2 pads (1, 1) too and 16 is even.
    check_spectrum(spectra["conv_a/kernel"], weights["conv_a/kernel"], (15, 15),
                   embedding=(16, 16))
    check_spectrum(spectra["conv_b/kernel"], weights["conv_b/kernel"], (15, 15), strides=2,
                   embedding=(16, 16))
    check_spectrum(spectra["pointwise/kernel"], weights["pointwise/kernel"], (8, 8),
                   padding="valid", embedding=(8, 8))
    check_spectrum(spectra["head/kernel"], weights["head/kernel"], ())
    printed = capsys.readouterr().out
    assert "conv_b/kernel" in printed and "16x16" in printed and "*" not in printed
    assert "certified" in printed
    # The model is linear (no activation): its bound is at least the exact norm of
    # its Jacobian, the model applied to every basis vector (minus the biases).
    model = keras.saving.load_model(path)
    zero = model(np.zeros((1, 15, 15, 3), np.float32)).numpy()
    jacobian = reference.function_matrix(lambda x: model(x).numpy() - zero, (15, 15, 3))
    assert np.linalg.norm(jacobian, 2) <= result["lipschitz_bound"]
    assert "certified l2 Lipschitz upper bound" in printed


def test_layers_regex_and_float64(keras_file, tmp_path):
    path, weights = keras_file
    result = analyze.analyse(path, str(tmp_path), layers=r"^conv_", dtype="float64",
                             verbose=False)
    spectra = load_npz(str(tmp_path))
    assert list(spectra) == ["conv_a/kernel", "conv_b/kernel"]
    assert spectra["conv_a/kernel"]["sv"].dtype == np.float64
    # float64 all the way: agrees with the float64 explicit matrix far below
    # float32 rounding (a float32 computation cast to float64 is ~1e-7 off).
    circular = np.linalg.svd(reference.explicit_operator_matrix(
        weights["conv_a/kernel"].astype(np.float64), (16, 16)), compute_uv=False)
    got = spectra["conv_a/kernel"]["sv"]
    np.testing.assert_allclose(got, circular[:len(got)], rtol=0, atol=1e-11 * circular[0])
    assert len(result["spectra"]) == 2
    with pytest.raises(ValueError, match="matches none"):
        analyze.analyse(path, str(tmp_path), layers="nothing_like_this", verbose=False)
    with pytest.raises(ValueError, match="regular expression"):
        analyze.analyse(path, str(tmp_path), layers="(", verbose=False)


def test_other_layer_kinds_against_the_keras_layers_themselves(tmp_path):
    """Conv1D, SeparableConv1D, Conv1DTranspose, Conv3D and Conv3DTranspose in a
    .keras file: each part's reported spectrum has exactly the layer part's
    number of singular values and bounds each of them (the part as Keras
    computes it, on every basis vector), and lower <= its norm <= upper."""
    keras.utils.set_random_seed(5)
    L = keras.layers
    one_d = keras.Input((9, 2))
    x = L.Conv1D(3, 3, strides=2, padding="same", use_bias=False, name="c1")(one_d)
    x = L.SeparableConv1D(4, 3, padding="same", depth_multiplier=2, use_bias=False,
                          name="sep1")(x)
    x = L.Conv1DTranspose(2, 3, strides=2, padding="same", use_bias=False, name="t1")(x)
    three_d = keras.Input((5, 4, 3, 2))
    y = L.Conv3D(3, 3, strides=2, padding="same", use_bias=False, name="c3")(three_d)
    y = L.Conv3DTranspose(2, 2, strides=2, padding="valid", use_bias=False, name="t3")(y)
    model = keras.Model([one_d, three_d], [L.Flatten()(x), L.Flatten()(y)])
    path = str(tmp_path / "kinds.keras")
    model.save(path)
    out = str(tmp_path / "out")
    analyze.analyse(path, out, verbose=False)
    spectra = load_npz(out)
    expected = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        shape = tuple(layer.input.shape[1:])
        for part, (matrix, *_) in oracles.keras_part_matrices(layer, shape).items():
            name = f"{layer.name}/{part}"
            expected.add(name)
            entry, true = spectra[name], np.linalg.svd(matrix, compute_uv=False)
            if part == "kernel" and "Transpose" not in type(layer).__name__:
                assert entry["input_shape"] == shape[:-1], name  # transposed: the output's
            assert len(entry["sv"]) == len(true), name
            assert np.all(true <= entry["sv"] * (1 + 1e-5) + 1e-6), name
            assert entry["lower"] * (1 - 1e-5) <= true[0] <= entry["upper"] * (1 + 1e-5), name
    assert set(spectra) == expected


# ---------------------------------------------------------------------------
# TF2 checkpoint from a 1-step train.py run


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    from tfconvnorm import training as train  # pylint: disable=g-import-not-at-top
    model_dir = str(tmp_path_factory.mktemp("train") / "run")
    config = train.TrainConfig(dataset="digits", depth=8, epochs=1, batch_size=32, max_steps=1,
                               spectra_every_n_epochs=0, progress="none",
                               checkpoints_to_keep=1)
    train.train_and_evaluate(config, model_dir)
    return model_dir


@pytest.mark.slow
def test_tf2_checkpoint_from_train(train_dir, tmp_path):
    result = analyze.analyse(train_dir, str(tmp_path), verbose=False)
    assert result["format"] == "tf2" and "depth 8" in result["architecture"]
    check_outputs(result, str(tmp_path), 11)  # 10 convs + the dense logits
    # The checkpoint's values, read by name through TF's own restore.
    model = keras.saving.load_model(os.path.join(train_dir, "model.keras"), compile=False)
    restored = keras.models.clone_model(model)
    tf.train.Checkpoint(model=restored).restore(
        tf.train.latest_checkpoint(os.path.join(train_dir, "checkpoints"))).expect_partial()
    weights = {v.path: v.numpy() for v in restored.weights}
    spectra = load_npz(str(tmp_path))
    # Digits are 32x32x1; stages at 32, 32 -> 16 (stride 2), 16 -> 8 (stride 2).
    # 'same' 3x3: N = n + 1 (stride 1), 34 on 32 (stride 2); a 1x1 stride-2 conv: none.
    check_spectrum(spectra["stem_conv/kernel"], weights["stem_conv/kernel"], (32, 32),
                   embedding=(33, 33))
    check_spectrum(spectra["stage2_block1_conv1/kernel"], weights["stage2_block1_conv1/kernel"],
                   (32, 32), strides=2, embedding=(34, 34))
    check_spectrum(spectra["stage2_block1_shortcut/kernel"],
                   weights["stage2_block1_shortcut/kernel"], (32, 32), strides=2,
                   embedding=(32, 32))
    check_spectrum(spectra["stage3_block1_conv2/kernel"], weights["stage3_block1_conv2/kernel"],
                   (8, 8), embedding=(9, 9))
    check_spectrum(spectra["logits/kernel"], weights["logits/kernel"], ())


@pytest.mark.slow
def test_tf2_wrong_depth_names_file_and_variable(train_dir, tmp_path):
    prefix = tf.train.latest_checkpoint(os.path.join(train_dir, "checkpoints"))
    with pytest.raises(checkpoints.CheckpointError, match="does not match") as info:
        analyze.analyse(prefix, str(tmp_path), architecture="cifar_resnet_v2", depth=14,
                        verbose=False)
    assert prefix in str(info.value) and "variable '" in str(info.value)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------
# TF1 checkpoint with its .meta graph


@pytest.fixture(scope="module")
def tf1_prefix(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tf1") / "model.ckpt-100")
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 2], name="images")
        k1 = tf.compat.v1.get_variable("resnet_model/conv2d/kernel", [3, 3, 2, 3])
        x = tf.nn.conv2d(images, k1, strides=2, padding="SAME")
        k2 = tf.compat.v1.get_variable("resnet_model/conv2d_1/kernel", [1, 1, 3, 4])
        tf.nn.conv2d(x, k2, strides=1, padding="SAME")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(session, prefix)
    return prefix


def test_tf1_meta_checkpoint(tf1_prefix, tmp_path):
    result = analyze.analyse(tf1_prefix + ".meta", str(tmp_path), skip_1x1=True, verbose=False)
    assert result["format"] == "tf1_meta"
    check_outputs(result, str(tmp_path), 2)
    reader = tf.train.load_checkpoint(tf1_prefix)
    k1 = reader.get_tensor("resnet_model/conv2d/kernel")
    spectra = load_npz(str(tmp_path))
    # SAME stride 2 on 6: pads (0, 1), so 7, and 8 for the stride.
    check_spectrum(spectra["resnet_model/conv2d/kernel"], k1, (6, 6), strides=2,
                   embedding=(8, 8))
    assert spectra["resnet_model/conv2d/kernel"]["strides"] == (2, 2)
    check_spectrum(spectra["resnet_model/conv2d_1/kernel"],
                   reader.get_tensor("resnet_model/conv2d_1/kernel"), (3, 3), embedding=(3, 3))


# ---------------------------------------------------------------------------
# TF-slim resnet_v2_50 (random weights, slim names) and Keras applications .h5


def slim_resnet_v2_50_shapes():
    """slim's resnet_v2_50 variables, spelled out from its layout (not from our name map)."""
    scope = "resnet_v2_50"
    batch_norm = ("gamma", "beta", "moving_mean", "moving_variance")
    shapes = {f"{scope}/conv1/weights": (7, 7, 3, 64), f"{scope}/conv1/biases": (64,)}
    channels = 64
    for block, (units, depth) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), 1):
        for unit in range(1, units + 1):
            prefix = f"{scope}/block{block}/unit_{unit}/bottleneck_v2"
            shapes.update({f"{prefix}/preact/{v}": (channels,) for v in batch_norm})
            if unit == 1:
                shapes[f"{prefix}/shortcut/weights"] = (1, 1, channels, 4 * depth)
                shapes[f"{prefix}/shortcut/biases"] = (4 * depth,)
            shapes[f"{prefix}/conv1/weights"] = (1, 1, channels, depth)
            shapes[f"{prefix}/conv2/weights"] = (3, 3, depth, depth)
            for conv in ("conv1", "conv2"):
                shapes.update({f"{prefix}/{conv}/BatchNorm/{v}": (depth,) for v in batch_norm})
            shapes[f"{prefix}/conv3/weights"] = (1, 1, depth, 4 * depth)
            shapes[f"{prefix}/conv3/biases"] = (4 * depth,)
            channels = 4 * depth
    shapes.update({f"{scope}/postnorm/{v}": (2048,) for v in batch_norm})
    shapes[f"{scope}/logits/weights"] = (1, 1, 2048, 1001)
    shapes[f"{scope}/logits/biases"] = (1001,)
    return shapes


@pytest.fixture(scope="module")
def slim_checkpoint(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape, dtype=np.float32) * 0.05
               for name, shape in slim_resnet_v2_50_shapes().items()}
    prefix = str(tmp_path_factory.mktemp("slim") / "resnet_v2_50.ckpt")
    names = list(tensors) + ["global_step"]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names[:-1]]
                      + [tf.constant(np.int64(1000))])
    return prefix, tensors


# At 64x64 the padded inputs are 70 (stem), 18, 10, 6 and 4 for the 3x3 convs
# (Keras pads explicitly, then 'valid': N is the input size itself).
SLIM_CHECKS = {
    "resnet_v2_50/conv1/weights": ((70, 70), 2),
    "resnet_v2_50/block1/unit_1/bottleneck_v2/shortcut/weights": ((16, 16), 1),
    "resnet_v2_50/block1/unit_3/bottleneck_v2/conv2/weights": ((18, 18), 2),
    "resnet_v2_50/block2/unit_1/bottleneck_v2/conv2/weights": ((10, 10), 1),
    "resnet_v2_50/block3/unit_6/bottleneck_v2/conv3/weights": ((2, 2), 1),
}


@pytest.mark.slow
def test_slim_resnet_v2_50(slim_checkpoint, tmp_path):
    prefix, tensors = slim_checkpoint
    layers = "|".join(f"^{name}$" for name in SLIM_CHECKS) + "|logits"
    result = analyze.analyse(prefix, str(tmp_path), image_size=SLIM_IMAGE_SIZE, layers=layers,
                             verbose=False)
    assert result["format"] == "slim" and "ResNet50V2" in result["architecture"]
    check_outputs(result, str(tmp_path), len(SLIM_CHECKS) + 1)
    spectra = load_npz(str(tmp_path))
    for name, (size, stride) in SLIM_CHECKS.items():
        check_spectrum(spectra[name], tensors[name], size, stride, "valid", size)
        assert spectra[name]["strides"] == (stride, stride)
    # The classifier as stored: 2048 -> 1001 (background class included).
    check_spectrum(spectra["resnet_v2_50/logits/weights"],
                   tensors["resnet_v2_50/logits/weights"][0, 0], ())


@pytest.mark.slow
def test_slim_wrong_architecture_names_variable(slim_checkpoint, tmp_path):
    prefix, _ = slim_checkpoint
    with pytest.raises(checkpoints.CheckpointError,
                       match="'resnet_v2_101/conv1/weights'.*missing") as info:
        analyze.analyse(prefix, str(tmp_path), architecture="resnet_v2_101",
                        image_size=SLIM_IMAGE_SIZE, verbose=False)
    assert prefix in str(info.value)


@pytest.mark.slow
def test_slim_resnet_v2_50_every_layer(slim_checkpoint, tmp_path):
    prefix, tensors = slim_checkpoint
    result = analyze.analyse(prefix, str(tmp_path), image_size=SLIM_IMAGE_SIZE, verbose=False)
    spectra = load_npz(str(tmp_path))
    assert len(spectra) == 54  # 53 convs + logits
    assert sum(1 for s in spectra.values() if s["strides"] == (2, 2)) == 4
    for name, (size, stride) in SLIM_CHECKS.items():
        check_spectrum(spectra[name], tensors[name], size, stride, "valid", size)
    assert result["lipschitz_bound"] is None  # slim: the classifier has a background class


@pytest.fixture(scope="module")
def applications_model():
    keras.utils.set_random_seed(5)
    return keras.applications.ResNet50V2(weights=None, input_shape=(64, 64, 3))


# Keras ResNet50V2 at 64: same padded sizes as slim's.
H5_CHECKS = {
    "conv1_conv/kernel": ((70, 70), 2),
    "conv2_block3_2_conv/kernel": ((18, 18), 2),
    "conv3_block4_2_conv/kernel": ((10, 10), 2),
    "conv4_block1_0_conv/kernel": ((4, 4), 1),
}


def write_keras2_h5(path, model):
    """keras.applications' download layout: root `layer_names`, `layer/name:0` datasets."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        f.attrs["backend"] = b"tensorflow"
        for layer in model.layers:
            group = f.create_group(layer.name)
            variables = list(layer.trainable_weights) + list(layer.non_trainable_weights)
            names = [f"{layer.name}/{v.name}:0" for v in variables]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, variable in zip(names, variables):
                group.create_dataset(name, data=variable.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["keras3", "keras2"])
def test_keras_applications_h5(applications_model, tmp_path, kind):
    if kind == "keras3":
        path = str(tmp_path / "resnet50v2.weights.h5")
        applications_model.save_weights(path)
    else:
        path = str(tmp_path / "resnet50v2_weights_tf_dim_ordering_tf_kernels.h5")
        write_keras2_h5(path, applications_model)
    output_dir = str(tmp_path / "out")
    layers = "|".join(f"^{name}$" for name in H5_CHECKS)
    result = analyze.analyse(path, output_dir, image_size=64, layers=layers, verbose=False)
    assert result["format"] == "keras_weights" and "ResNet50V2" in result["architecture"]
    check_outputs(result, output_dir, len(H5_CHECKS))
    weights = {v.path: v.numpy() for v in applications_model.weights}
    spectra = load_npz(output_dir)
    for name, (size, stride) in H5_CHECKS.items():
        check_spectrum(spectra[name], weights[name], size, stride, "valid", size)


# The deeper nets' own blocks (conv3 has 8 blocks only in 152, conv4 23 / 36)
# at 64: the stride sits on each stage's last block.
DEEP_CHECKS = {
    101: {"conv4_block22_2_conv/kernel": ((6, 6), 1), "conv4_block23_2_conv/kernel": ((6, 6), 2),
          "conv3_block4_2_conv/kernel": ((10, 10), 2)},
    152: {"conv3_block8_2_conv/kernel": ((10, 10), 2), "conv4_block35_2_conv/kernel": ((6, 6), 1),
          "conv4_block36_2_conv/kernel": ((6, 6), 2)},
}


@pytest.mark.slow
@pytest.mark.parametrize("depth", [101, 152])
def test_deeper_keras_applications_h5(tmp_path, depth):
    """A ResNet101V2 / 152V2 weights file (keras.applications' download name):
    the architecture comes from the name, and the blocks only the deeper nets
    have are read with their geometry (the whole net costs a minute: the
    layer regex keeps this test to the blocks that tell depths apart)."""
    keras.utils.set_random_seed(depth)
    model = getattr(keras.applications, f"ResNet{depth}V2")(weights=None, input_shape=(64, 64, 3))
    path = str(tmp_path / f"resnet{depth}v2_weights_tf_dim_ordering_tf_kernels.h5")
    write_keras2_h5(path, model)
    output_dir = str(tmp_path / "out")
    layers = "|".join(f"^{name}$" for name in DEEP_CHECKS[depth])
    result = analyze.analyse(path, output_dir, image_size=64, layers=layers, verbose=False)
    assert f"ResNet{depth}V2" in result["architecture"]
    spectra = load_npz(output_dir)
    assert sorted(spectra) == sorted(DEEP_CHECKS[depth])
    weights = {v.path: v.numpy() for v in model.weights}
    for name, (size, stride) in DEEP_CHECKS[depth].items():
        check_spectrum(spectra[name], weights[name], size, stride, "valid", size)


# ---------------------------------------------------------------------------
# The binary


def run_binary(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(REPO, "analyze.py"), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_binary_end_to_end(keras_file, tmp_path):
    path, weights = keras_file
    done = run_binary(f"--checkpoint={path}", f"--output_dir={tmp_path}", "--skip_1x1",
                      "--nolog_scale", "--log_rank")
    assert done.returncode == 0, done.stderr
    assert "certified l2 Lipschitz upper bound" in done.stdout
    assert "conv_b/kernel" in done.stdout
    spectra = load_npz(str(tmp_path))
    check_spectrum(spectra["conv_b/kernel"], weights["conv_b/kernel"], (15, 15), strides=2,
                   embedding=(16, 16))


def test_binary_errors_without_traceback(keras_file, tmp_path):
    missing = str(tmp_path / "no_such_model.keras")
    done = run_binary(f"--checkpoint={missing}", f"--output_dir={tmp_path / 'out'}")
    assert done.returncode != 0
    assert "no_such_model.keras" in done.stderr and "Traceback" not in done.stderr
    truncated = str(tmp_path / "cut.keras")
    data = open(keras_file[0], "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[:len(data) // 2])
    done = run_binary(f"--checkpoint={truncated}", f"--output_dir={tmp_path / 'out'}")
    assert done.returncode != 0
    assert "cut.keras" in done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "out")


def test_main_flag_errors(keras_file):
    from absl import app  # pylint: disable=g-import-not-at-top
    from absl import flags  # pylint: disable=g-import-not-at-top
    flag_values = flags.FlagValues()
    analyze_cli.define_flags(flag_values)  # nothing is defined at import
    flag_values(["analyze.py", f"--checkpoint={keras_file[0]}"])
    with pytest.raises(app.UsageError, match="--output_dir"):
        analyze_cli.main(["analyze.py"], flag_values)
    with pytest.raises(app.UsageError, match="Unexpected"):
        analyze_cli.main(["analyze.py", "extra"], flag_values)
    flag_values.unparse_flags()
    flag_values(["analyze.py", f"--checkpoint={keras_file[0]}", "--output_dir=x", "--layers=("])
    with pytest.raises(app.UsageError, match="regular expression"):
        analyze_cli.main(["analyze.py"], flag_values)


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float16"}, "dtype"), ({"format": "pickle"}, "format"),
    ({"architecture": "vgg16"}, "architecture"), ({"image_size": 0}, "image_size"),
    ({"output_dir": ""}, "output_dir")])
def test_bad_arguments(keras_file, tmp_path, kwargs, match):
    arguments = {"output_dir": str(tmp_path), **kwargs}
    with pytest.raises(ValueError, match=match):
        analyze.analyse(keras_file[0], verbose=False, **arguments)


@pytest.mark.parametrize("skip_1x1,log_scale,log_rank", [(True, False, True), (False, True, False)])
def test_plot_options_change_the_plot(keras_file, tmp_path, monkeypatch, skip_1x1, log_scale,
                                      log_rank):
    """--skip_1x1 leaves the 1x1 conv's curve out (its spectrum stays in the npz),
    --log_scale / --log_rank set the value / rank axes: read off the figure itself."""
    figures = []
    real = analyze.plotting.figure_to_png
    monkeypatch.setattr(analyze.plotting, "figure_to_png",
                        lambda fig, *a, **k: figures.append(fig) or real(fig, *a, **k))
    path, _ = keras_file
    analyze.analyse(path, str(tmp_path), skip_1x1=skip_1x1, log_scale=log_scale,
                    log_rank=log_rank, verbose=False)
    (figure,) = figures
    (ax,) = [a for a in figure.axes if a.get_lines()]
    labels = {line.get_label() for line in ax.get_lines()}
    assert ("pointwise/kernel" in labels) is not skip_1x1
    assert {"conv_a/kernel", "conv_b/kernel", "head/kernel"} <= labels
    assert ax.get_yscale() == ("log" if log_scale else "linear")
    assert ax.get_xscale() == ("log" if log_rank else "linear")
    assert ("1x1 convs skipped" in ax.get_title()) is skip_1x1
    assert "pointwise/kernel" in load_npz(str(tmp_path))  # skipped from the plot only


def test_format_flag_is_used_not_guessed(keras_file, tmp_path):
    path, weights = keras_file
    named = analyze.analyse(path, str(tmp_path / "named"), format="keras", verbose=False)
    assert named["format"] == "keras"
    check_spectrum(load_npz(str(tmp_path / "named"))["conv_a/kernel"], weights["conv_a/kernel"],
                   (15, 15), embedding=(16, 16))
    # Told it is another format, the reader of that format runs, and says why it cannot.
    for wrong in ("tf2", "tf1_meta", "keras_weights", "savedmodel"):
        with pytest.raises((checkpoints.CheckpointError, ValueError)):
            analyze.analyse(path, str(tmp_path / wrong), format=wrong, verbose=False)
        assert not os.path.exists(tmp_path / wrong / checkpoints.SPECTRA_FILENAME)


def test_safe_mode_refuses_a_keras_file_with_code(tmp_path):
    """A .keras file with a Lambda layer carries Python bytecode; the analyser
    loads in Keras' safe mode, so it refuses the file instead of running it."""
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", name="conv")(inputs)
    outputs = keras.layers.Lambda(lambda t: t * 2.0, name="code")(x)
    path = str(tmp_path / "unsafe.keras")
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(checkpoints.CheckpointError, match="(?i)unsafe.keras.*(safe_mode|lambda)"):
        analyze.analyse(path, str(tmp_path / "out"), verbose=False)
    assert not os.path.exists(tmp_path / "out" / checkpoints.SPECTRA_FILENAME)


def test_circular_boundary_gives_the_papers_operator_at_each_input_size(tmp_path):
    """--boundary=circular: each conv's circular operator at its input size, strides
    included (the published Fig. 5), against the explicit circular matrix;
    sizes a stride does not divide are rounded up and marked approximate."""
    keras.utils.set_random_seed(6)
    L = keras.layers
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(3, 3, strides=2, padding="same", use_bias=False, name="strided")(inputs)
    x = L.DepthwiseConv2D(3, padding="valid", use_bias=False, name="dw")(x)  # 4 -> 2
    x = L.Conv2DTranspose(2, 3, strides=2, padding="same", use_bias=False, name="up")(x)
    odd = keras.Input((7, 7, 2))
    y = L.Conv2D(2, 3, strides=2, padding="same", use_bias=False, name="odd")(odd)
    out = L.Dense(2, use_bias=False, name="fc")(L.Concatenate()([L.Flatten()(x),
                                                                  L.Flatten()(y)]))
    model = keras.Model([inputs, odd], out)
    path = str(tmp_path / "c.keras")
    model.save(path)
    flag_values = __import__("absl.flags", fromlist=["flags"]).FlagValues()
    analyze_cli.define_flags(flag_values)
    flag_values(["analyze.py", f"--checkpoint={path}", f"--output_dir={tmp_path / 'out'}",
                 "--boundary=circular", "--bound_iterations=4"])
    analyze_cli.main(["analyze.py"], flag_values)
    spectra = load_npz(str(tmp_path / "out"))
    cases = {  # name: (kernel in conv layout, circular input size, strides, groups, approximate)
        "strided/kernel": (model.get_layer("strided").kernel.numpy(), (8, 8), 2, 1, False),
        "dw/kernel": (model.get_layer("dw").kernel.numpy().reshape(3, 3, 1, 3), (4, 4), 1, 3,
                      False),
        # The transposed layer's forward operator: its input size times the strides.
        "up/kernel": (model.get_layer("up").kernel.numpy(), (4, 4), 2, 1, False),
        "odd/kernel": (model.get_layer("odd").kernel.numpy(), (8, 8), 2, 1, True),
    }
    for name, (kernel, size, strides, groups, approximate) in cases.items():
        entry = spectra[name]
        assert entry["padding"] == "circular" and entry["input_shape"] == size, name
        assert entry["approximate"] == approximate, name
        matrix = reference.explicit_operator_matrix(kernel, size, strides, groups=groups)
        np.testing.assert_allclose(np.sort(entry["sv"])[::-1],
                                   np.linalg.svd(matrix, compute_uv=False), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose(spectra["fc/kernel"]["sv"], np.linalg.svd(
        model.get_layer("fc").kernel.numpy(), compute_uv=False), rtol=1e-5)
    with pytest.raises(ValueError, match="boundary"):
        analyze.analyse(path, str(tmp_path / "x"), boundary="torus", verbose=False)
