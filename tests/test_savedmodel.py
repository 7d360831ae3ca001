"""tfconvnorm.checkpoints.savedmodel: SavedModels read as data, nothing loaded or run.

The SavedModels are written here (Keras `model.export()` and plain `tf.Module`s
with `tf.nn.conv2d` in NHWC and NCHW, strides, dilation, SAME / VALID /
explicit pads, depthwise, a nested tf.function), their geometry written out
by hand, their kernels compared with the variables saved, and their spectra
with the explicit zero-padded matrix of each op.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfconvnorm import analysis
from tfconvnorm import checkpoints
from tfconvnorm import reference


class _Convs(tf.Module):
    """NCHW and NHWC convs, dilation, strides, explicit pads, depthwise, and a
    conv inside a nested tf.function (reached through a call op)."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.nchw = tf.Variable(rng.normal(size=(3, 3, 2, 5)).astype(np.float32), name="nchw")
        self.dilated = tf.Variable(rng.normal(size=(3, 3, 5, 4)).astype(np.float32),
                                   name="dilated")
        self.depthwise = tf.Variable(rng.normal(size=(3, 3, 4, 2)).astype(np.float32),
                                     name="depthwise")
        self.explicit = tf.Variable(rng.normal(size=(2, 3, 8, 3)).astype(np.float32),
                                    name="explicit")
        self.dense = tf.Variable(rng.normal(size=(3, 4)).astype(np.float32), name="dense")

    @tf.function
    def inner(self, y):
        return tf.nn.conv2d(y, self.explicit, [1, 2, 1, 1],
                            [[0, 0], [1, 2], [0, 1], [0, 0]])

    @tf.function(input_signature=[tf.TensorSpec((None, 2, 11, 10), tf.float32)])
    def __call__(self, x):
        y = tf.nn.conv2d(x, self.nchw, [1, 1, 2, 1], "VALID", data_format="NCHW")
        y = tf.transpose(y, [0, 2, 3, 1])                       # (5, 8, 5) NHWC
        y = tf.nn.conv2d(y, self.dilated, 1, "SAME", dilations=2)
        y = tf.nn.depthwise_conv2d(y, self.depthwise, [1, 1, 1, 1], "SAME")
        y = self.inner(y)                                       # (4, 7, 3)
        return tf.matmul(tf.reduce_mean(y, [1, 2]), self.dense)


# name -> (input size, strides, dilation, groups, padding, kind)
MODULE_GEOMETRY = {
    "nchw": ((11, 10), (2, 1), (1, 1), 1, "valid", "conv"),
    "dilated": ((5, 8), (1, 1), (2, 2), 1, "same", "conv"),
    "depthwise": ((5, 8), (1, 1), (1, 1), 4, "same", "depthwise"),
    "explicit": ((5, 8), (2, 1), (1, 1), 1, ((1, 2), (0, 1)), "conv"),
    "dense": ((), (), (), 1, "dense", "dense"),
}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("savedmodel") / "convs")
    module = _Convs()
    tf.saved_model.save(module, path)
    return path, {v.name.split(":")[0]: v.numpy() for v in module.variables}


def _check_spectrum(record, size, strides, dilation, groups, padding):
    kernel = record.kernel.astype(np.float64)
    (spectrum,) = checkpoints.layer_spectra([record], dtype="float64")
    if record.geometry.kind == "dense":
        exact = np.linalg.svd(kernel, compute_uv=False)
    else:
        matrix = reference.explicit_padded_operator_matrix(kernel, size, strides, dilation,
                                                           groups, padding)
        exact = reference.grouped_singular_values(matrix, kernel.shape[-1],
                                                  kernel.shape[-2] * groups, groups)
    assert spectrum.count == len(exact)
    assert np.all(exact <= spectrum.singular_values * (1 + 1e-9))
    assert spectrum.sigma_max_lower <= exact[0] <= spectrum.sigma_max_upper


def test_tf_module_with_every_op_kind(module_dir):
    path, values = module_dir
    assert checkpoints.detect_format(path) == "savedmodel"
    assert checkpoints.detect_format(os.path.join(path, "saved_model.pb")) == "savedmodel"
    records = checkpoints.read_savedmodel(path)
    assert sorted(r.name for r in records) == sorted(MODULE_GEOMETRY)
    for record in records:
        size, strides, dilation, groups, padding, kind = MODULE_GEOMETRY[record.name]
        g = record.geometry
        assert (g.input_shape, g.strides, g.dilation_rate, g.groups, g.padding, g.kind) == (
            size, strides, dilation, groups, padding, kind), record.name
        value = values[record.name]
        if kind == "depthwise":
            value = value.reshape(3, 3, 1, 8)
        np.testing.assert_array_equal(record.kernel, value)
        _check_spectrum(record, size, strides, dilation, groups, padding)


def test_keras_export_and_analysis(tmp_path):
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((9, 9, 3)),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", name="c1"),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
        keras.layers.Conv2D(2, 1, name="pw"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="fc"),
    ])
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    records = {r.name.split("/")[-2]: r for r in checkpoints.read_savedmodel(path)}
    assert sorted(records) == ["c1", "dw", "fc", "pw"]
    assert records["c1"].geometry.input_shape == (9, 9)
    assert records["c1"].geometry.padding == "same"
    assert records["dw"].geometry.groups == 4 and records["dw"].geometry.input_shape == (5, 5)
    assert records["pw"].geometry.input_shape == (3, 3)
    for name, record in records.items():
        layer = model.get_layer(name)
        value = layer.kernel.numpy()
        np.testing.assert_array_equal(
            record.kernel, value.reshape(record.kernel.shape))
    # Each kernel once, although three traced functions capture it.
    assert len(checkpoints.read_savedmodel(path)) == 4
    result = analysis.analyse(path, str(tmp_path / "out"), verbose=False, bound_iterations=4)
    assert result["format"] == "savedmodel" and len(result["spectra"]) == 4
    assert result["lipschitz_bound"] is None  # read as graphs, not as a Keras model


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoints.read_savedmodel(str(tmp_path / "nothing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(checkpoints.CheckpointError, match="broken"):
        checkpoints.read_savedmodel(str(broken))
    (tmp_path / "plain").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="not a SavedModel"):
        checkpoints.read_savedmodel(str(tmp_path / "plain"))


def test_open_input_size_needs_image_size(tmp_path):
    class Open(tf.Module):
        def __init__(self):
            super().__init__()
            self.k = tf.Variable(tf.ones((3, 3, 2, 2)), name="k")

        @tf.function(input_signature=[tf.TensorSpec((None, None, None, 2), tf.float32)])
        def __call__(self, x):
            return tf.nn.conv2d(x, self.k, 2, "SAME")

    path = str(tmp_path / "open")
    tf.saved_model.save(Open(), path)
    with pytest.raises(checkpoints.CheckpointError, match="image_size"):
        checkpoints.read_savedmodel(path)
    (record,) = checkpoints.read_savedmodel(path, image_size=7)
    assert record.geometry.input_shape == (7, 7) and record.geometry.strides == (2, 2)
