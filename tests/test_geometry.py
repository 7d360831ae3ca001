"""Tests for tfconvnorm.geometry: which kernels are operators, and their geometry.

Oracles: hand-written expectations for the geometry, and for the spectra the
explicit matrix of the Keras layer itself (applied to basis vectors): as it
is (zero padding, the default boundary), or made circular by wrap-padding
its input and running a 'valid' twin of the layer (boundary="circular").
The full grid of padded layers against their own matrices is in
test_layer_bounds.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from tfconvnorm import geometry


def _mixed_2d_model():
    inputs = keras.Input((16, 16, 4))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="strided")(inputs)
    x = keras.layers.Conv2D(8, 3, dilation_rate=2, padding="same", name="dilated")(x)
    x = keras.layers.Conv2D(6, 3, groups=2, padding="valid", name="grouped")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="depthwise")(x)
    x = keras.layers.SeparableConv2D(5, 3, strides=2, depth_multiplier=1, padding="same",
                                     name="separable")(x)
    x = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="transposed")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, name="dense")(x)
    return keras.Model(inputs, outputs)


def test_mixed_model_geometry_matches_hand_written_expectations():
    operators = geometry.model_geometry(_mixed_2d_model())
    got = {op.name: op.geometry for op in operators}
    G = geometry.ConvGeometry
    expected = {
        "strided/kernel": G((3, 3, 4, 8), (16, 16), (2, 2), (1, 1), 1, "conv", "same"),
        "dilated/kernel": G((3, 3, 8, 8), (8, 8), (1, 1), (2, 2), 1, "conv", "same"),
        "grouped/kernel": G((3, 3, 4, 6), (8, 8), (1, 1), (1, 1), 2, "conv", "valid"),
        # 'valid' above: 8 -> 6.
        "depthwise/kernel": G((3, 3, 1, 12), (6, 6), (1, 1), (1, 1), 6, "depthwise", "same"),
        "separable/depthwise_kernel": G((3, 3, 1, 12), (6, 6), (2, 2), (1, 1), 12,
                                        "separable_depthwise", "same"),
        # A 1x1 conv of the depthwise part's output (ceil(6 / 2) = 3): no pads.
        "separable/pointwise_kernel": G((1, 1, 12, 5), (3, 3), (1, 1), (1, 1), 1,
                                        "separable_pointwise", "valid"),
        # The adjoint of a 'same' stride-2 conv of the layer's 6x6 output.
        "transposed/kernel": G((3, 3, 4, 5), (6, 6), (2, 2), (1, 1), 1, "conv_transpose", "same"),
        "dense/kernel": G((4, 3), (), (), (), 1, "dense", "dense"),
    }
    assert got == expected
    assert [op.layer.name for op in operators] == [
        "strided", "dilated", "grouped", "depthwise", "separable", "separable",
        "transposed", "dense"]
    for op in operators:
        assert op.variable.path == op.name
        g = op.geometry
        assert g.is_certified
        assert g.spectral_kwargs() == dict(
            input_shape=g.input_shape, strides=g.strides, dilation_rate=g.dilation_rate,
            groups=g.groups, **({} if g.kind == "dense" else {"padding": g.padding}))
    # Embedding sizes: 'same' 3x3 stride 2 on 16 pads (0, 1) -> 17 -> 18; stride 1
    # dilation 2 pads (2, 2) -> 10; 'valid' needs none.
    assert got["strided/kernel"].embedding_shape == (18, 18)
    assert got["dilated/kernel"].embedding_shape == (10, 10)
    assert got["grouped/kernel"].embedding_shape == (8, 8)
    assert got["transposed/kernel"].layer_input_shape == (3, 3)
    assert got["dense/kernel"].embedding_shape == ()


def test_circular_boundary_is_the_published_operator():
    model = _mixed_2d_model()
    got = {op.name: op.geometry for op in geometry.model_geometry(model, boundary="circular")}
    G = geometry.ConvGeometry
    assert got["strided/kernel"] == G((3, 3, 4, 8), (16, 16), (2, 2), (1, 1), 1, "conv",
                                      "circular", layer_padding="same")
    # Circular: a stride-2 conv maps 6 to 3, and the transposed one is its adjoint on 6.
    assert got["separable/pointwise_kernel"] == G((1, 1, 12, 5), (3, 3), (1, 1), (1, 1), 1,
                                                  "separable_pointwise", "circular",
                                                  layer_padding="same")
    assert got["transposed/kernel"] == G((3, 3, 4, 5), (6, 6), (2, 2), (1, 1), 1,
                                         "conv_transpose", "circular", layer_padding="same")
    assert got["dense/kernel"] == G((4, 3), (), (), (), 1, "dense", "dense")
    assert not got["strided/kernel"].is_certified and got["dense/kernel"].is_certified
    assert got["strided/kernel"].embedding_shape == (16, 16)
    with pytest.raises(ValueError, match=r"`boundary` must be one of .*boundary='zero'"):
        geometry.model_geometry(model, boundary="zero")


def test_conv1d_causal_and_depthwise1d():
    model = keras.Sequential([
        keras.Input((12, 3)),
        keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2, name="causal"),
        keras.layers.DepthwiseConv1D(3, strides=2, padding="same", name="dw1d"),
        keras.layers.Conv1DTranspose(2, 3, strides=3, name="tr1d"),
    ])
    got = {op.layer.name: op.geometry for op in geometry.model_geometry(model)}
    assert got["causal"] == geometry.ConvGeometry((3, 3, 4), (12,), (1,), (2,), 1, "conv", "causal")
    assert got["dw1d"] == geometry.ConvGeometry((3, 1, 4), (12,), (2,), (1,), 4, "depthwise", "same")
    assert got["tr1d"] == geometry.ConvGeometry((3, 2, 4), (18,), (3,), (1,), 1, "conv_transpose",
                                                "valid")
    assert got["causal"].embedding == tfconvnorm.CircularEmbedding((16,), (12,), ((4, 0),))


def test_channels_first_spatial_axes():
    model = keras.Sequential([
        keras.Input((3, 10, 12)),
        keras.layers.Conv2D(4, 3, strides=2, data_format="channels_first", name="cf"),
    ])
    (op,) = geometry.model_geometry(model)
    assert op.geometry.input_shape == (10, 12)
    assert op.geometry.kernel_shape == (3, 3, 3, 4)


def _basis_matrix(fn, in_shape):
    """Explicit matrix (outputs x inputs) of a linear map on one sample of `in_shape`."""
    n = int(np.prod(in_shape))
    outputs = np.asarray(fn(tf.reshape(tf.eye(n, dtype=tf.float64), (n,) + tuple(in_shape))))
    return outputs.reshape(n, -1).T


def _wrap_pad(x, amounts):
    """Circular padding of the spatial axes (channels last) at the end."""
    for axis, amount in enumerate(amounts, start=1):
        if amount:
            head = tf.gather(x, tf.range(amount), axis=axis)
            x = tf.concat([x, head], axis=axis)
    return x


def _circular_twin_spectrum(layer, weight, in_size, channels):
    """Singular values of `layer`'s circular operator, from Keras' own 'valid' conv."""
    config = layer.get_config()
    config.update(padding="valid", use_bias=False, dtype="float64")
    del config["name"]
    twin = type(layer).from_config(config)
    twin.build((None,) + tuple(in_size) + (channels,))
    twin.set_weights([np.asarray(weight, np.float64)])
    pad = [(k - 1) * d for k, d in zip(layer.kernel_size, layer.dilation_rate)]
    matrix = _basis_matrix(lambda x: twin(_wrap_pad(x, pad)), tuple(in_size) + (channels,))
    return np.linalg.svd(matrix, compute_uv=False)


def _core_spectrum(op):
    kernel = op.to_spectral(tf.cast(op.variable.value, tf.float64))
    return tfconvnorm.conv_singular_values(kernel, **op.geometry.spectral_kwargs()).numpy()


def _assert_blockwise_spectrum(got, expected_full, count):
    """`got` is the block-by-block spectrum (exactly `count` values) of a
    matrix whose plain SVD is `expected_full`: the same values, and the
    plain SVD's extra ones (a wide or tall grouped operator) are zeros."""
    assert len(got) == count
    np.testing.assert_allclose(got, expected_full[:count], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(expected_full[count:], 0, atol=1e-9)


@pytest.mark.parametrize("make_layer", [
    lambda: keras.layers.Conv2D(3, 3, strides=2, padding="same"),
    lambda: keras.layers.Conv2D(4, (3, 2), dilation_rate=(2, 1), padding="same"),
    lambda: keras.layers.Conv2D(4, 3, groups=2, padding="same"),
    lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
    lambda: keras.layers.DepthwiseConv2D(2, strides=2, padding="same"),
    lambda: keras.layers.Conv1D(3, 3, strides=2, padding="causal"),
])
def test_spectrum_of_geometry_equals_layer_circular_operator(make_layer):
    layer = make_layer()
    rank = layer.rank
    in_size = (8, 6)[:rank]
    channels = 2
    model = keras.Sequential([keras.Input(in_size + (channels,)), layer])
    (op,) = geometry.model_geometry(model, boundary="circular")
    expected = _circular_twin_spectrum(layer, op.variable.numpy(), in_size, channels)
    g = op.geometry
    out = int(np.prod([n // s for n, s in zip(in_size, g.strides)]))
    c_out = g.kernel_shape[-1]
    count = g.groups * min(out * c_out // g.groups, int(np.prod(in_size)) * channels // g.groups)
    _assert_blockwise_spectrum(_core_spectrum(op), expected, count)


def test_transposed_conv_is_the_adjoint_of_the_strided_conv():
    """Kernel 'as is' with input size * strides: the Keras layer's own matrix is the
    transpose of the strided conv's, so the spectra agree (checked for 'same')."""
    in_size, strides, channels = (4, 4), 2, 3
    model = keras.Sequential([
        keras.Input(in_size + (channels,)),
        keras.layers.Conv2DTranspose(2, 3, strides=strides, padding="same", use_bias=False,
                                     dtype="float64")])
    (op,) = geometry.model_geometry(model)
    assert op.geometry.input_shape == (8, 8) and op.geometry.layer_input_shape == (4, 4)
    kernel = op.variable.numpy()  # (3, 3, filters=2, in=3)
    transposed = _basis_matrix(model, in_size + (channels,))
    conv = keras.layers.Conv2D(3, 3, strides=strides, padding="same", use_bias=False,
                               dtype="float64")
    conv.build((None, 8, 8, 2))
    conv.set_weights([kernel])
    forward = _basis_matrix(conv, (8, 8, 2))
    np.testing.assert_allclose(transposed, forward.T, atol=1e-12)
    # And the geometry's spectrum bounds the zero-padded operator's, entry by entry.
    sigma = _core_spectrum(op)
    exact = np.linalg.svd(transposed, compute_uv=False)
    assert len(sigma) == len(exact) == 4 * 4 * 3
    assert np.all(exact <= sigma * (1 + 1e-9))


def test_separable_parts_and_dense_against_explicit_matrices():
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.SeparableConv2D(3, 3, depth_multiplier=2, strides=2, padding="same",
                                     name="sep"),
        keras.layers.Flatten(),
        keras.layers.Dense(5, name="fc"),
    ])
    # Variables built inside a Sequential get its name as a path prefix.
    ops = {op.name.removeprefix(model.name + "/"): op
           for op in geometry.model_geometry(model, boundary="circular")}
    depthwise = ops["sep/depthwise_kernel"]
    twin = keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same")
    twin.build((None, 6, 6, 2))
    expected = _circular_twin_spectrum(twin, depthwise.variable.numpy(), (6, 6), 2)
    # Depthwise: 2 groups of (3x3 outputs * 2 channels) x (6x6 inputs * 1 channel).
    _assert_blockwise_spectrum(_core_spectrum(depthwise), expected, 2 * min(18, 36))
    pointwise = ops["sep/pointwise_kernel"]
    matrix = pointwise.variable.numpy()[0, 0]
    expected = np.repeat(np.linalg.svd(matrix, compute_uv=False), 9)  # 3x3 positions
    np.testing.assert_allclose(np.sort(_core_spectrum(pointwise))[::-1], np.sort(expected)[::-1],
                               rtol=1e-5)
    dense = ops["fc/kernel"]
    np.testing.assert_allclose(_core_spectrum(dense),
                               np.linalg.svd(dense.variable.numpy(), compute_uv=False), rtol=1e-5)


def test_to_and_from_spectral_round_trip_depthwise():
    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=3)
    layer.build((None, 8, 8, 2))
    (op,) = geometry.layer_geometry(layer, input_shape=8)
    value = op.variable.value
    conv = op.to_spectral(value)
    assert tuple(conv.shape) == (3, 3, 1, 6)
    # Output channel c * m + j of Keras' depthwise conv is kernel[..., c, j].
    np.testing.assert_array_equal(conv.numpy()[:, :, 0, 1 * 3 + 2], value.numpy()[:, :, 1, 2])
    np.testing.assert_array_equal(op.from_spectral(conv).numpy(), value.numpy())


def test_nested_model_with_unknown_sizes_gets_outer_sizes():
    inner_in = keras.Input((None, None, 4))
    inner = keras.Model(inner_in, keras.layers.Conv2D(4, 3, padding="same", name="inner_conv")(
        inner_in), name="inner")
    outer_in = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="first")(outer_in)
    outer = keras.Model(outer_in, inner(x))
    got = {op.layer.name: op.geometry.input_shape for op in geometry.model_geometry(outer)}
    assert got == {"first": (10, 10), "inner_conv": (5, 5)}
    # The inner model alone declares no size: a clear error naming the remedy.
    with pytest.raises(ValueError, match=r"inner_conv.*unknown.*input_shape="):
        geometry.model_geometry(inner)
    got = geometry.model_geometry(inner, input_shape=(7, 9, 4))
    assert got[0].geometry.input_shape == (7, 9)
    got = geometry.model_geometry(inner, layer_input_shapes={"inner_conv": (6, 6)})
    assert got[0].geometry.input_shape == (6, 6)


def test_layer_called_twice():
    shared = keras.layers.Conv2D(3, 3, padding="same", name="shared")
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    same = keras.Model([a, b], [shared(a), shared(b)])
    (op,) = geometry.model_geometry(same)
    assert op.geometry.input_shape == (8, 8)
    c = keras.Input((6, 6, 3))
    different = keras.Model([a, c], [shared(a), shared(c)])
    with pytest.raises(ValueError, match=r"'shared'.*different spatial sizes.*\(6, 6\).*\(8, 8\)"):
        geometry.model_geometry(different)
    (op,) = geometry.model_geometry(different, layer_input_shapes={"shared": (6, 6)})
    assert op.geometry.input_shape == (6, 6)


def test_subclassed_model_uses_build_shapes():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, strides=3, name="conv")
            self.fc = keras.layers.Dense(2, name="fc")

        def call(self, x):
            return self.fc(keras.ops.mean(self.conv(x), axis=(1, 2)))

    net = Net()
    with pytest.raises(ValueError, match="not built"):
        geometry.model_geometry(net)
    net(np.zeros((1, 9, 12, 2), np.float32))
    got = {op.layer.name: op.geometry for op in geometry.model_geometry(net)}
    assert got["conv"].input_shape == (9, 12) and got["conv"].strides == (3, 3)
    assert got["fc"].kind == "dense"


def test_circular_stride_must_divide_input_size_or_round_up():
    model = keras.Sequential([keras.Input((9, 8, 2)),
                              keras.layers.Conv2D(2, 3, strides=2, name="odd")])
    with pytest.raises(ValueError, match=r"'odd'.*\(2, 2\).*\(9, 8\)"):
        geometry.model_geometry(model, boundary="circular")
    (op,) = geometry.model_geometry(model, round_up=True, boundary="circular")
    assert op.geometry.input_shape == (10, 8) and op.geometry.approximate
    assert not op.geometry.is_certified
    # The layer's own 'valid' padding needs no rounding: 9 -> 4 outputs, N = 10.
    for round_up in (False, True):
        (op,) = geometry.model_geometry(model, round_up=round_up)
        assert op.geometry.input_shape == (9, 8) and not op.geometry.approximate
        assert op.geometry.embedding_shape == (10, 8) and op.geometry.is_certified
    # A layer left out by `layers=` does not stop the others.
    model = keras.Sequential([keras.Input((9, 8, 2)),
                              keras.layers.Conv2D(2, 3, strides=2, name="odd2"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="fc")])
    (op,) = geometry.model_geometry(model, layers=["fc"], boundary="circular")
    assert op.layer.name == "fc"
    with pytest.raises(ValueError, match="'odd2'"):
        geometry.model_geometry(model, layers=[f"{model.name}/odd2/kernel"],
                                boundary="circular")


def test_layer_selection_and_errors():
    model = _mixed_2d_model()
    names = [op.name for op in geometry.model_geometry(model, layers=["separable", "dense"])]
    assert names == ["separable/depthwise_kernel", "separable/pointwise_kernel", "dense/kernel"]
    names = [op.name for op in geometry.model_geometry(model,
                                                         layers=["separable/pointwise_kernel"])]
    assert names == ["separable/pointwise_kernel"]
    kinds = {op.geometry.kind for op in geometry.model_geometry(model,
                                                                  kinds=geometry.CONV_KINDS)}
    assert "dense" not in kinds and len(kinds) == 5
    with pytest.raises(ValueError, match=r"Unknown layer names \['nope'\].*Available.*strided"):
        geometry.model_geometry(model, layers=["nope"])
    with pytest.raises(ValueError, match=r"\['pool'\] exist but are not linear-operator"):
        geometry.model_geometry(model, layers=["pool"])
    with pytest.raises(ValueError, match="Unknown operator kinds"):
        geometry.model_geometry(model, kinds=["convolution"])
    with pytest.raises(ValueError, match="must be a keras.Model; received Dense"):
        geometry.model_geometry(keras.layers.Dense(2))


def test_layer_geometry_errors():
    unbuilt = keras.layers.Conv2D(2, 3, name="unbuilt")
    with pytest.raises(ValueError, match="'unbuilt' is not built"):
        geometry.layer_geometry(unbuilt)
    with pytest.raises(ValueError, match="not a linear operator layer"):
        geometry.layer_geometry(keras.layers.BatchNormalization())
    built = keras.layers.Conv2D(2, 3, name="loose")
    built.build((None, None, None, 3))
    with pytest.raises(ValueError, match=r"'loose'.*unknown.*input_shape="):
        geometry.layer_geometry(built)
    (op,) = geometry.layer_geometry(built, input_shape=5)
    assert op.geometry.input_shape == (5, 5)
    with pytest.raises(ValueError, match=r"input_shape=\(5, 5, 5\)"):
        geometry.layer_geometry(built, input_shape=(5, 5, 5))


def test_public_names_are_exported():
    """The Keras glue is reachable from the package root (and importing the
    package registers the constraint and regularizer for `.keras` loading)."""
    from tfconvnorm import callbacks, constraints  # pylint: disable=import-outside-toplevel
    expected = {
        "layer_geometry": geometry.layer_geometry,
        "model_geometry": geometry.model_geometry,
        "ConvGeometry": geometry.ConvGeometry,
        "LayerOperator": geometry.LayerOperator,
        "CONV_KINDS": geometry.CONV_KINDS,
        "OperatorNormConstraint": constraints.OperatorNormConstraint,
        "OperatorNormRegularizer": constraints.OperatorNormRegularizer,
        "constrain": constraints.constrain,
        "OperatorNormClipper": callbacks.OperatorNormClipper,
        "SpectrumLogger": callbacks.SpectrumLogger,
    }
    for name, value in expected.items():
        assert getattr(tfconvnorm, name, None) is value, name
    assert keras.saving.get_registered_object(
        "tfconvnorm>OperatorNormConstraint") is constraints.OperatorNormConstraint


def test_the_kind_table_matches_the_keras_layers_it_names():
    # One entry per kind is all a new kind needs in the library: its classes,
    # variable and constraint attributes must be real, and the constraint
    # layout must be a kind with a constraint of its own.
    from tfconvnorm.geometry import KINDS  # pylint: disable=import-outside-toplevel
    from tfconvnorm.constraints import LAYOUTS  # pylint: disable=import-outside-toplevel
    assert set(KINDS) == set(geometry.ALL_KINDS)
    for spec in KINDS.values():
        assert spec.layout in LAYOUTS and spec.fold_scale is not None, spec.kind
        for cls in spec.layer_classes:
            rank = 3 if "1D" in cls.__name__ else 5 if "3D" in cls.__name__ else 4
            args = ((3,) if cls is keras.layers.Dense else
                    (3,) if cls.__name__.startswith("Depthwise") else (3, 2))
            layer = cls(*args)  # a fresh layer of the class
            layer.build((None,) + (6,) * (rank - 2) + (2,) if rank > 2 else (None, 2))
            assert hasattr(getattr(layer, spec.variable), "assign"), (spec.kind, cls)
            assert hasattr(layer, spec.constraint_attribute), (spec.kind, cls)
    # Folding a scale on the output-channel axis: the layer's output scaled.
    layer = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False)
    x = np.random.default_rng(0).standard_normal((1, 5, 5, 3)).astype(np.float32)
    expected = layer(x).numpy() * np.arange(1, 7)
    layer.kernel.assign(KINDS["depthwise"].fold_scale(layer.kernel.numpy(),
                                                     np.arange(1, 7, dtype=np.float32)))
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-6)
