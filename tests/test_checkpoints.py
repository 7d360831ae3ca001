"""Tests of tfconvnorm/checkpoints.py: every reader on small local files, and the outputs.

Geometry expectations are written out by hand (input size, strides, padding,
embedding size, ...), and spectra and norm bounds are checked against the
explicit matrices of `reference` (the circular operator on the embedding
size, and the zero-padded layer itself), so the readers are not checked
against themselves.
"""

import csv
import os

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from tfconvnorm import checkpoints
from tfconvnorm import reference


def tiny_model(channels=8, extra_layer=False):
    inputs = keras.Input((15, 15, 3))
    x = keras.layers.Conv2D(channels, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    # 15 is odd: the stride-2 'valid' conv embeds into a circular one on 16.
    x = keras.layers.Conv2D(4, 3, strides=2, name="c2")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    if extra_layer:
        x = keras.layers.Conv2D(8, 1, name="extra")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, name="d")(x)
    return keras.Model(inputs, outputs)


# Hand-written geometry of tiny_model:
# name -> (input size, strides, groups, kind, padding, embedding size N).
TINY_GEOMETRY = {
    "c1/kernel": ((15, 15), (1, 1), 1, "conv", "same", (16, 16)),   # pads (1, 1)
    "c2/kernel": ((15, 15), (2, 2), 1, "conv", "valid", (16, 16)),  # 7 outputs * 2 > 15
    "dw/kernel": ((7, 7), (1, 1), 4, "depthwise", "valid", (7, 7)),
    "d/kernel": ((), (), 1, "dense", "dense", ()),
}


def check_tiny_record(record, name, model):
    size, strides, groups, kind, padding, embedding = TINY_GEOMETRY[name]
    g = record.geometry
    assert (g.input_shape, g.strides, g.groups, g.kind, g.padding, g.embedding_shape,
            g.approximate) == (size, strides, groups, kind, padding, embedding, False), name
    expected = {v.path: v for v in model.weights}[name].numpy()
    if kind == "depthwise":  # (k, k, c, m) -> (k, k, 1, c * m)
        expected = expected.reshape(3, 3, 1, 8)
    np.testing.assert_array_equal(record.kernel, expected)
    assert record.kernel.shape == g.kernel_shape


def check_tiny_records(records, model):
    assert [r.name for r in records] == list(TINY_GEOMETRY)
    for record in records:
        check_tiny_record(record, record.name, model)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(1)
    return tiny_model()


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("ckpts")
    paths = {"keras": str(root / "m.keras"), "weights": str(root / "m.weights.h5"),
             "legacy": str(root / "m.h5"), "tf2": str(root / "tf2")}
    model.save(paths["keras"])
    model.save_weights(paths["weights"])
    model.save(paths["legacy"])  # legacy HDF5 format: a model_weights group
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), paths["tf2"], 2)
    paths["tf2_prefix"] = manager.save()
    return paths


def test_keras_model_file(files, model):
    assert checkpoints.detect_format(files["keras"]) == "keras"
    check_tiny_records(checkpoints.read_keras_model_file(files["keras"]), model)


def test_tf2_checkpoint(files, model):
    assert checkpoints.detect_format(files["tf2"]) == "tf2"
    assert checkpoints.resolve_checkpoint_prefix(files["tf2"]) == files["tf2_prefix"]
    fresh = tiny_model()
    records = checkpoints.read_tf2_checkpoint(files["tf2_prefix"] + ".index", fresh)
    check_tiny_records(records, model)
    # The model given is only the architecture: its weights stay as they were.
    assert not np.array_equal(fresh.get_layer("c1").kernel.numpy(),
                              model.get_layer("c1").kernel.numpy())


@pytest.mark.parametrize("other,match", [
    (lambda: tiny_model(channels=6), r"variable 'c1/kernel' .*has shape \(3, 3, 3, 8\)"),
    (lambda: tiny_model(extra_layer=True), "variable 'extra/kernel'.*missing"),
])
def test_tf2_mismatch_names_variable(files, other, match):
    with pytest.raises(checkpoints.CheckpointError, match=match) as info:
        checkpoints.read_tf2_checkpoint(files["tf2"], other())
    assert files["tf2"] in str(info.value)


def test_tf2_extra_checkpoint_variable(tmp_path):
    # Keras 3 checkpoint keys are positional: a layer added last keeps the
    # others' keys, so only the extra variables mismatch.
    base = tiny_model()
    bigger = keras.Model(base.inputs, keras.layers.Dense(3, name="head")(base.outputs[0]))
    prefix = tf.train.Checkpoint(model=bigger).save(str(tmp_path / "ckpt"))
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"checkpoint variable 'model/.*has no counterpart in the model"):
        checkpoints.read_tf2_checkpoint(prefix, tiny_model())


@pytest.mark.parametrize("kind", ["weights", "legacy"])
def test_keras_weights_files(files, model, kind, monkeypatch):
    assert checkpoints.detect_format(files[kind]) == "keras_weights"
    fresh = tiny_model()
    before = fresh.get_layer("c1").kernel.numpy()

    def refuse(*args, **kwargs):
        raise AssertionError("a reader wrote into the caller's model")

    # Not a single write, not even one undone afterwards.
    monkeypatch.setattr(type(fresh.get_layer("c1").kernel), "assign", refuse)
    check_tiny_records(checkpoints.read_keras_weights_file(files[kind], fresh), model)
    monkeypatch.undo()
    np.testing.assert_array_equal(fresh.get_layer("c1").kernel.numpy(), before)


@pytest.mark.parametrize("kind", ["weights", "legacy"])
@pytest.mark.parametrize("other,match", [
    (lambda: tiny_model(channels=6), r"'c1/kernel'.*shape \(3, 3, 3, 8\) in the file"),
    (lambda: tiny_model(extra_layer=True), "extra"),
])
def test_keras_weights_mismatch_names_variable(files, kind, other, match):
    with pytest.raises(checkpoints.CheckpointError, match=match) as info:
        checkpoints.read_keras_weights_file(files[kind], other())
    assert files[kind] in str(info.value)


def test_keras3_weights_file_with_fewer_layers_is_refused(files):
    # Keras' own loader would silently load a matching subset here.
    smaller = keras.Sequential([keras.Input((15, 15, 3)), keras.layers.Conv2D(8, 3, name="c1")])
    with pytest.raises(checkpoints.CheckpointError, match="no counterpart in the model"):
        checkpoints.read_keras_weights_file(files["weights"], smaller)


def test_keras2_style_h5(tmp_path, model):
    """The layout of keras.applications' downloads: root layer_names, `name:0` weights."""
    path = str(tmp_path / "keras2.h5")
    with h5py.File(path, "w") as f:
        layers = [layer for layer in model.layers if layer.weights]
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        for layer in model.layers:
            group = f.create_group(layer.name)
            variables = list(layer.trainable_weights) + list(layer.non_trainable_weights)
            names = [f"{layer.name}/{v.name}:0".encode() for v in variables]
            group.attrs["weight_names"] = names
            for name, variable in zip(names, variables):
                group.create_dataset(name.decode(), data=variable.numpy())
        assert layers
    check_tiny_records(checkpoints.read_keras_weights_file(path, tiny_model()), model)


def write_tf1_graph(prefix, save_all=True):
    """A TF1 graph with Conv2D / depthwise / dilated / NCHW convs, saved with its .meta."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.set_random_seed(0)
        images = tf.compat.v1.placeholder(tf.float32, [None, 13, 13, 3], name="images")
        w1 = tf.compat.v1.get_variable("net/conv1/kernel", [3, 3, 3, 4])
        y = tf.nn.conv2d(images, w1, strides=2, padding="SAME")
        # A ref (VariableV2) variable next to the resource ones.
        w2 = tf.compat.v1.Variable(tf.random.normal([3, 3, 4, 2]), name="net/dw/kernel",
                                   use_resource=False)
        y = tf.nn.depthwise_conv2d(y, w2, [1, 1, 1, 1], "SAME")
        w3 = tf.compat.v1.get_variable("net/conv3/kernel", [3, 3, 8, 5])
        y = tf.nn.conv2d(y, w3, 1, "SAME", dilations=2)
        nchw = tf.compat.v1.placeholder(tf.float32, [None, 3, 8, 8], name="nchw")
        w4 = tf.compat.v1.get_variable("net/conv4/kernel", [3, 3, 3, 6])
        tf.nn.conv2d(nchw, w4, strides=[1, 1, 2, 2], padding="VALID", data_format="NCHW")
        w5 = tf.compat.v1.get_variable("net/conv5/kernel", [2, 3, 3, 2])
        tf.nn.conv2d(nchw, w5, strides=[1, 1, 1, 2], data_format="NCHW",
                     padding=[[0, 0], [0, 0], [1, 2], [0, 1]])
        # Gradients hold Conv2DBackpropInput ops that are not layers.
        tf.compat.v1.gradients(tf.reduce_sum(y), [images])
        variables = tf.compat.v1.global_variables()
        saver = tf.compat.v1.train.Saver(variables if save_all else variables[1:])
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, prefix)
    return prefix


# name -> (kernel shape (conv layout), input size, strides, dilation, groups, padding)
TF1_GEOMETRY = {
    "net/conv1/kernel": ((3, 3, 3, 4), (13, 13), (2, 2), (1, 1), 1, "same"),
    "net/dw/kernel": ((3, 3, 1, 8), (7, 7), (1, 1), (1, 1), 4, "same"),
    "net/conv3/kernel": ((3, 3, 8, 5), (7, 7), (1, 1), (2, 2), 1, "same"),
    "net/conv4/kernel": ((3, 3, 3, 6), (8, 8), (2, 2), (1, 1), 1, "valid"),
    "net/conv5/kernel": ((2, 3, 3, 2), (8, 8), (1, 2), (1, 1), 1, ((1, 2), (0, 1))),
}


@pytest.fixture(scope="module")
def tf1_prefix(tmp_path_factory):
    return write_tf1_graph(str(tmp_path_factory.mktemp("tf1") / "model.ckpt"))


def test_tf1_meta_checkpoint(tf1_prefix):
    assert checkpoints.detect_format(tf1_prefix + ".meta") == "tf1_meta"
    assert checkpoints.detect_format(os.path.dirname(tf1_prefix)) == "tf1_meta"
    records = checkpoints.read_tf1_meta_checkpoint(tf1_prefix)
    assert [r.name for r in records] == list(TF1_GEOMETRY)
    reader = tf.train.load_checkpoint(tf1_prefix)
    for record in records:
        shape, size, strides, dilation, groups, padding = TF1_GEOMETRY[record.name]
        g = record.geometry
        assert (g.kernel_shape, g.input_shape, g.strides, g.dilation_rate, g.groups,
                g.padding, g.approximate) == (shape, size, strides, dilation, groups, padding,
                                              False)
        np.testing.assert_array_equal(record.kernel,
                                      reader.get_tensor(record.name).reshape(shape))


@pytest.mark.parametrize("index", [0, 3, 4])  # SAME stride 2 on 13; NCHW VALID; EXPLICIT
def test_tf1_spectra_bound_the_op_itself(tf1_prefix, index):
    """The op's own padding and data format: the spectrum is the circular one on
    N, and it and the norm interval bound the op's explicit matrix."""
    record = checkpoints.read_tf1_meta_checkpoint(tf1_prefix)[index]
    shape, size, strides, dilation, groups, padding = TF1_GEOMETRY[record.name]
    (spectrum,) = checkpoints.layer_spectra([record], dtype="float64")
    kernel = record.kernel.astype(np.float64)
    c_in, c_out = shape[-2] * groups, shape[-1]
    circular = reference.grouped_singular_values(reference.explicit_operator_matrix(
        kernel, record.geometry.embedding_shape, strides, dilation, groups), c_out, c_in, groups)
    layer = reference.grouped_singular_values(reference.explicit_padded_operator_matrix(
        kernel, size, strides, dilation, groups, padding), c_out, c_in, groups)
    assert spectrum.count == len(layer)
    np.testing.assert_allclose(spectrum.singular_values, circular[:len(layer)], rtol=1e-8)
    assert np.all(layer <= spectrum.singular_values * (1 + 1e-9))
    assert spectrum.sigma_max_lower <= layer[0] <= spectrum.sigma_max_upper


def test_tf1_unknown_input_size_needs_image_size(tmp_path):
    prefix = str(tmp_path / "open.ckpt")
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="images")
        kernel = tf.compat.v1.get_variable("k", [3, 3, 3, 2])
        tf.nn.conv2d(images, kernel, strides=2, padding="SAME")
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(session, prefix)
    with pytest.raises(checkpoints.CheckpointError, match="image_size"):
        checkpoints.read_tf1_meta_checkpoint(prefix)
    (record,) = checkpoints.read_tf1_meta_checkpoint(prefix, image_size=10)
    assert record.geometry.input_shape == (10, 10) and record.geometry.strides == (2, 2)


def test_tf1_missing_variable_is_named(tmp_path):
    prefix = write_tf1_graph(str(tmp_path / "partial.ckpt"), save_all=False)
    with pytest.raises(checkpoints.CheckpointError, match="'net/conv1/kernel'.*missing") as info:
        checkpoints.read_tf1_meta_checkpoint(prefix)
    assert prefix in str(info.value)


def test_tf1_truncated_meta(tmp_path, tf1_prefix):
    prefix = str(tmp_path / "model.ckpt")
    for suffix in (".index", ".data-00000-of-00001"):
        with open(tf1_prefix + suffix, "rb") as src, open(prefix + suffix, "wb") as dst:
            dst.write(src.read())
    with open(tf1_prefix + ".meta", "rb") as src, open(prefix + ".meta", "wb") as dst:
        dst.write(src.read()[:100])
    with pytest.raises(checkpoints.CheckpointError, match="model.ckpt.meta"):
        checkpoints.read_tf1_meta_checkpoint(prefix)


def test_tf1_without_meta_is_not_guessed(tmp_path, tf1_prefix):
    prefix = str(tmp_path / "model.ckpt")
    for suffix in (".index", ".data-00000-of-00001"):
        with open(tf1_prefix + suffix, "rb") as src, open(prefix + suffix, "wb") as dst:
            dst.write(src.read())
    with pytest.raises(checkpoints.CheckpointError, match=r"\.meta"):
        checkpoints.detect_format(prefix)


def write_name_based(prefix, tensors):
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(tensors),
                      shape_and_slices=[""] * len(tensors),
                      tensors=[tf.constant(v) for v in tensors.values()])
    return prefix


def test_slim_reader_with_background_class(tmp_path, model):
    """Any model + name map; the classifier stored as a 1x1 conv with one extra class."""
    tensors = {}
    for variable in model.weights:
        value = variable.numpy()
        if variable.path == "d/kernel":
            value = np.concatenate([np.ones((8, 1), np.float32), value], 1)[None, None]
        if variable.path == "d/bias":
            value = np.concatenate([[0.5], value]).astype(np.float32)
        tensors["resnet_v2_9/" + variable.path] = value
    tensors["global_step"] = np.int64(3)
    tensors["resnet_v2_9/c1/kernel/Momentum"] = np.zeros((3, 3, 3, 8), np.float32)
    prefix = write_name_based(str(tmp_path / "slim.ckpt"), tensors)
    assert checkpoints.detect_format(prefix) == "slim"
    records = checkpoints.read_slim_resnet_v2(prefix, tiny_model(),
                                              lambda path: "resnet_v2_9/" + path)
    assert [r.name for r in records] == ["resnet_v2_9/" + n for n in TINY_GEOMETRY]
    dense = records[-1]
    assert dense.geometry.kind == "dense" and dense.kernel.shape == (8, 11)
    assert dense.geometry.kernel_shape == (8, 11)
    np.testing.assert_array_equal(dense.kernel, tensors["resnet_v2_9/d/kernel"][0, 0])
    for record, name in zip(records[:-1], TINY_GEOMETRY):
        check_tiny_record(record, name, model)


def test_slim_reader_mismatch(tmp_path, model):
    tensors = {"resnet_v2_9/" + v.path: v.numpy() for v in model.weights}
    tensors["resnet_v2_9/unknown/weights"] = np.zeros((1, 1, 2, 2), np.float32)
    prefix = write_name_based(str(tmp_path / "extra.ckpt"), tensors)
    with pytest.raises(checkpoints.CheckpointError, match="'resnet_v2_9/unknown/weights'"):
        checkpoints.read_slim_resnet_v2(prefix, tiny_model(), lambda p: "resnet_v2_9/" + p)
    with pytest.raises(checkpoints.CheckpointError, match="'other/c1/kernel'.*missing"):
        checkpoints.read_slim_resnet_v2(prefix, tiny_model(), lambda p: "other/" + p)
    with pytest.raises(checkpoints.CheckpointError, match=r"'resnet_v2_9/c1/kernel' has shape"):
        checkpoints.read_slim_resnet_v2(prefix, tiny_model(channels=6),
                                        lambda p: "resnet_v2_9/" + p)


def test_missing_and_truncated_files(tmp_path, files):
    missing = str(tmp_path / "nothing.ckpt")
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        checkpoints.detect_format(missing)
    with pytest.raises(FileNotFoundError, match="nothing.keras"):
        checkpoints.read_keras_model_file(str(tmp_path / "nothing.keras"))
    for kind, name in (("keras", "cut.keras"), ("weights", "cut.weights.h5")):
        data = open(files[kind], "rb").read()
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
        with pytest.raises(checkpoints.CheckpointError, match=name):
            if kind == "keras":
                checkpoints.read_keras_model_file(path)
            else:
                checkpoints.read_keras_weights_file(path, tiny_model())
    # A TF checkpoint whose data file is cut short.
    prefix = str(tmp_path / "cut" / "ckpt")
    os.makedirs(os.path.dirname(prefix))
    source = files["tf2_prefix"]
    for suffix in (".index", ".data-00000-of-00001"):
        data = open(source + suffix, "rb").read()
        with open(prefix + suffix, "wb") as f:
            f.write(data if suffix == ".index" else data[:len(data) // 3])
    with pytest.raises(checkpoints.CheckpointError, match="cut/ckpt"):
        checkpoints.read_tf2_checkpoint(prefix, tiny_model())


def test_spectra_and_output_files(tmp_path, model):
    records = checkpoints.model_records(model)
    spectra = checkpoints.layer_spectra(records)
    for record, spectrum in zip(records, spectra):
        size, strides, groups, kind, padding, embedding = TINY_GEOMETRY[record.name]
        kernel = record.kernel.astype(np.float64)
        c_out = kernel.shape[-1]
        c_in = kernel.shape[-2] * groups
        if kind == "dense":
            circular = layer = np.linalg.svd(kernel, compute_uv=False)
        else:
            circular = reference.grouped_singular_values(reference.explicit_operator_matrix(
                kernel, embedding, strides, 1, groups), c_out, c_in, groups)
            layer = reference.grouped_singular_values(reference.explicit_padded_operator_matrix(
                kernel, size, strides, 1, groups, padding), c_out, c_in, groups)
        assert spectrum.count == len(layer), record.name
        np.testing.assert_allclose(spectrum.singular_values, circular[:len(layer)], rtol=1e-5,
                                   atol=1e-6 * circular[0])
        assert spectrum.sigma_max_lower <= layer[0] <= spectrum.sigma_max_upper, record.name
    npz = str(tmp_path / "out" / "spectra.npz")
    checkpoints.write_spectra_npz(npz, spectra, {"format": "keras"})
    with np.load(npz, allow_pickle=False) as data:
        assert list(data["names"]) == list(TINY_GEOMETRY)
        np.testing.assert_array_equal(data["sv/1"], spectra[1].singular_values)
        np.testing.assert_array_equal(data["strides/1"], [2, 2])
        np.testing.assert_array_equal(data["embedding_shape/1"], [16, 16])
        np.testing.assert_array_equal(data["padding"], ["same", "valid", "valid", "dense"])
        np.testing.assert_array_equal(data["approximate"], [False] * 4)
        np.testing.assert_array_equal(data["sigma_max_upper"],
                                      [s.sigma_max_upper for s in spectra])
        assert str(data["meta/format"]) == "keras"
    again, metadata = checkpoints.read_spectra_npz(npz)
    assert [s.geometry for s in again] == [s.geometry for s in spectra]
    assert [(s.sigma_max_lower, s.sigma_max_upper) for s in again] == [
        (s.sigma_max_lower, s.sigma_max_upper) for s in spectra]
    assert metadata == {"format": "keras"}
    assert os.listdir(tmp_path / "out") == ["spectra.npz"]  # no temporary left behind

    path = str(tmp_path / "summary.csv")
    certificate = tfconvnorm.lipschitz_bound(model)
    checkpoints.write_summary_csv(path, spectra, certificate)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == list(TINY_GEOMETRY) + [checkpoints.LIPSCHITZ_ROW_NAME]
    assert rows[1]["strides"] == "2x2" and rows[1]["approximate"] == "False"
    assert rows[1]["input_size"] == "15x15" and rows[1]["embedding_size"] == "16x16"
    assert rows[1]["padding"] == "valid" and "upper bounds" in rows[1]["note"]
    assert rows[3]["note"] == ""  # Dense: exact
    assert float(rows[0]["sigma_max"]) == spectra[0].sigma_max
    assert float(rows[0]["sigma_max_upper"]) == spectra[0].sigma_max_upper
    assert float(rows[0]["sigma_max_lower"]) == spectra[0].sigma_max_lower
    assert int(rows[2]["count"]) == spectra[2].count
    assert float(rows[-1]["sigma_max_upper"]) == float(certificate)
    assert "Lipschitz" in rows[-1]["note"] and "largest factors" in rows[-1]["note"]
    table = checkpoints.format_summary_table(spectra, lipschitz=certificate)
    assert "c2/kernel" in table and "16x16" in table and "valid" in table
    assert "*" not in table and "certified" in table and f"{float(certificate):.6g}" in table
    # Without a model: the row says why.
    checkpoints.write_summary_csv(path, spectra, unavailable="a TF1 graph")
    with open(path, newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert last["sigma_max_upper"] == "" and "a TF1 graph" in last["note"]


def test_float64_spectra(model):
    records = checkpoints.model_records(model)[:1]
    (spectrum,) = checkpoints.layer_spectra(records, dtype="float64")
    assert spectrum.singular_values.dtype == np.float64
    with pytest.raises(ValueError, match="dtype"):
        checkpoints.layer_spectra(records, dtype="float16")


def test_the_reader_table_claims_each_file_once_and_read_dispatches_on_it(files, tf1_prefix,
                                                                           model):
    # FORMATS, --format and detection all come from READERS: a reader missing
    # from the table, or two readers claiming one file, show up here.
    assert checkpoints.FORMATS == tuple(r.FORMAT for r in checkpoints.READERS)
    assert len(set(checkpoints.FORMATS)) == len(checkpoints.READERS) == 6
    cases = {files["keras"]: "keras", files["weights"]: "keras_weights",
             files["legacy"]: "keras_weights", files["tf2_prefix"]: "tf2",
             tf1_prefix: "tf1_meta"}
    for path, fmt in cases.items():
        claimed = []
        for reader in checkpoints.READERS:
            try:
                if reader.detect(path):
                    claimed.append(reader.FORMAT)
            except (checkpoints.CheckpointError, FileNotFoundError):
                pass  # the TF-checkpoint readers refuse files that are not checkpoints
        assert claimed == [fmt], path
        assert checkpoints.detect_format(path) == fmt
    # The files that carry their own architecture read without one.
    for path in (files["keras"], tf1_prefix):
        found = checkpoints.read(path)
        assert isinstance(found, checkpoints.Checkpoint)
        assert (found.format, found.path) == (cases[path], path)
        assert (found.model is None) == (found.no_model is not None)
    check_tiny_records(checkpoints.read(files["keras"]).records, model)
    with pytest.raises(ValueError, match="format must be one of"):
        checkpoints.read(files["keras"], format="onnx")
