"""Tests for tfconvnorm.callbacks: OperatorNormClipper and SpectrumLogger.

Kernels are recorded by independent callbacks around the one tested. Norms
and spectra are checked against explicit matrices (`oracles`: the layer as the
model computes it, and the circular operator on its embedding size); that a
projection is the core's (`clip_conv_singular_values`) is plumbing, checked
as such.
"""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import tfconvnorm
from tfconvnorm import geometry
from tfconvnorm import reference
from tfconvnorm.callbacks import (OperatorNormClipper, SpectrumLogger, SPECTRA_SUBDIR,
                                  make_projection_fn)
import oracles


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, name="fc")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.05), "mse")
    return model


def _data(rng, n):
    return (rng.standard_normal((n, 8, 8, 2)).astype(np.float32),
            rng.standard_normal((n, 2)).astype(np.float32))


class _KernelRecorder(keras.callbacks.Callback):
    """Records every kernel's value at each batch end, keyed by optimizer step."""

    def __init__(self):
        super().__init__()
        self.kernels = {}

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.kernels[step] = {op.name: op.variable.numpy()
                              for op in geometry.model_geometry(self.model)}


def _clip(op, kernel, max_norm, method):
    conv = op.to_spectral(tf.constant(kernel))
    clipped = tfconvnorm.clip_conv_singular_values(conv, max_norm=max_norm, method=method,
                                                   **op.geometry.spectral_kwargs())
    return op.from_spectral(clipped).numpy()


_norm = oracles.true_norm


@pytest.mark.parametrize("method", ["alternating", "paper",
                                    pytest.param("exact", marks=pytest.mark.slow)])
def test_clipper_projects_at_steps_3_6_9_and_not_between(method, rng):
    model = _model()
    before, after = _KernelRecorder(), _KernelRecorder()
    clipper = OperatorNormClipper(0.4, every_n_steps=3, method=method)
    model.fit(*_data(rng, 40), batch_size=4, epochs=1, verbose=0,
              callbacks=[before, clipper, after])
    operators = geometry.model_geometry(model)
    assert sorted(after.kernels) == list(range(1, 11))
    for step in range(1, 11):
        for op in operators:
            pre, post = before.kernels[step][op.name], after.kernels[step][op.name]
            if step % 3:
                np.testing.assert_array_equal(post, pre, err_msg=f"{op.name} step {step}")
            else:
                np.testing.assert_allclose(post, _clip(op, pre, 0.4, method), rtol=1e-5,
                                           atol=1e-6, err_msg=f"{op.name} step {step}")
                if method != "paper":  # the real layer's norm, padding included
                    assert _norm(op, post) <= 0.4 * (1 + 1e-4)
    # Training moved the norms above the bound between projections, so the
    # test above had something to see.
    drift = max(_norm(op, before.kernels[step][op.name])
                for op in operators for step in (4, 5, 7, 8))
    assert drift > 0.4 * 1.01
    last = clipper.last_projection
    assert last["step"] == 9 and last["names"] == [op.name for op in operators]
    # The logged norms are the upper bounds: the circular operators on N.
    np.testing.assert_allclose(
        last["before"], [oracles.circular_norm(op, before.kernels[9][op.name])
                         for op in operators], rtol=1e-5)
    np.testing.assert_allclose(
        last["after"], [oracles.circular_norm(op, after.kernels[9][op.name])
                        for op in operators], rtol=1e-5)


def test_clipper_with_circular_boundary_projects_the_published_operator(rng):
    model = _model()
    clipper = OperatorNormClipper(0.4, every_n_steps=1, method="alternating",
                                  boundary="circular")
    model.fit(*_data(rng, 4), batch_size=4, epochs=1, verbose=0, callbacks=[clipper])
    for op in geometry.model_geometry(model, boundary="circular"):
        assert oracles.circular_norm(op) <= 0.4 * (1 + 1e-4)
        assert op.geometry.embedding_shape == op.geometry.input_shape


def test_clipper_is_one_compiled_call_traced_once_per_model(rng):
    model = _model()
    clipper = OperatorNormClipper(0.5, every_n_steps=2, layers=["conv", "depthwise"],
                                  method="alternating")
    model.fit(*_data(rng, 16), batch_size=4, epochs=2, verbose=0, callbacks=[clipper])
    model.fit(*_data(rng, 8), batch_size=4, epochs=1, verbose=0, callbacks=[clipper])
    _, operators, fn = clipper._cache  # pylint: disable=protected-access
    assert [op.layer.name for op in operators] == ["conv", "depthwise"]
    assert isinstance(fn, tf.types.experimental.PolymorphicFunction)
    assert fn.experimental_get_tracing_count() == 1
    norms = clipper.project_now()
    assert set(norms) == {op.name for op in operators}
    assert all(after <= 0.5 * (1 + 1e-4) for _, after in norms.values())


@pytest.mark.slow
def test_clipper_logs_norms_before_and_after(caplog, rng):
    from absl import logging  # pylint: disable=import-outside-toplevel
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.INFO)
    model = _model()
    try:
        with caplog.at_level("INFO"):
            model.fit(*_data(rng, 8), batch_size=4, verbose=0,
                      callbacks=[OperatorNormClipper(0.5, every_n_steps=2, method="alternating")])
    finally:
        logging.set_verbosity(verbosity)
    messages = [r.getMessage() for r in caplog.records if "OperatorNormClipper" in r.getMessage()]
    assert len(messages) == 1
    assert "step 2" in messages[0] and "before" in messages[0] and "after" in messages[0]


def test_projection_fn_is_all_or_nothing_on_non_finite_kernels():
    model = _model()
    operators = geometry.model_geometry(model)
    fn = make_projection_fn(operators, 0.1, method="alternating")
    bad = operators[-1].variable
    bad.assign(np.full(bad.shape, np.nan, np.float32))
    originals = [op.variable.numpy() for op in operators[:-1]]
    with pytest.raises(tf.errors.InvalidArgumentError):
        fn()
    for op, original in zip(operators, originals):
        np.testing.assert_array_equal(op.variable.numpy(), original)
    assert np.all(np.isnan(bad.numpy()))


def _conv_bn_model(seed, learning_rate):
    """conv -> BN -> pooling -> dense, compiled: the smallest model whose BN
    statistics depend on a conv kernel."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6, 6, 2)),
                              keras.layers.Conv2D(3, 3, padding="same", use_bias=False,
                                                  name="conv"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(learning_rate), "mse")
    return model


def test_clipper_re_estimates_batch_norm_after_each_projection(rng):
    """After a projection the BN statistics are those of the projected conv: each
    moving mean/variance is the average over the given batches of the BN input's
    batch mean/variance, computed here from the projected kernel by hand."""
    model = _conv_bn_model(seed=0, learning_rate=0.1)
    x, y = rng.standard_normal((12, 6, 6, 2)).astype(np.float32) * 3, np.zeros((12, 2))
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    bn = model.get_layer("bn")
    clipper = OperatorNormClipper(0.05, every_n_steps=2, batch_norm_data=data,
                                  batch_norm_batches=3)
    model.fit(data, epochs=1, shuffle=False, verbose=0, callbacks=[clipper])
    assert clipper.last_projection["step"] == 2
    before = bn.moving_mean.numpy().copy()
    clipper.project_now()
    h = tf.nn.conv2d(x, model.get_layer("conv").kernel.numpy(), 1, "SAME").numpy()
    h = h.reshape(3, 4 * 6 * 6, 3)  # per batch: every position is a sample
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(1).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(1).mean(0), rtol=1e-4)
    assert not np.allclose(before, bn.moving_mean.numpy())  # the conv was projected again
    assert bn.momentum == 0.99  # restored
    # Without batch_norm_data a projection leaves the statistics alone.
    plain = OperatorNormClipper(0.01)
    plain.set_model(model)
    stats = bn.moving_variance.numpy().copy()
    plain.project_now()
    np.testing.assert_array_equal(bn.moving_variance.numpy(), stats)


def test_precise_batch_norm_validates_with_statistics_of_the_current_weights(rng):
    """Validation after an epoch sees BN statistics re-estimated on the training
    batches with the weights as they are: checked from the final kernel by hand,
    and by the logged val_loss equalling a later evaluate (nothing changed since)."""
    model = _conv_bn_model(seed=1, learning_rate=0.5)
    x = rng.standard_normal((8, 6, 6, 2)).astype(np.float32) * 2 + 1
    y = rng.standard_normal((8, 2)).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    history = model.fit(data, validation_data=data, epochs=1, shuffle=False, verbose=0,
                        callbacks=[tfconvnorm.PreciseBatchNorm(data, num_batches=2)])
    h = tf.nn.conv2d(x, model.get_layer("conv").kernel.numpy(), 1, "SAME").numpy()
    h = h.reshape(2, 4 * 36, 3)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(1).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(1).mean(0), rtol=1e-4)
    assert history.history["val_loss"][0] == pytest.approx(model.evaluate(data, verbose=0),
                                                           rel=1e-5)
    with pytest.raises(TypeError, match="dataset must be a tf.data.Dataset .*got list"):
        tfconvnorm.PreciseBatchNorm([x, y])
    with pytest.raises(ValueError, match=re.escape("`num_batches` must be a positive int; "
                                                   "received num_batches=0.")):
        tfconvnorm.PreciseBatchNorm(data, num_batches=0)


def test_clipper_bad_arguments(rng):
    with pytest.raises(ValueError, match=r"max_norm=-1"):
        OperatorNormClipper(-1)
    with pytest.raises(ValueError, match=r"every_n_steps=0"):
        OperatorNormClipper(1.0, every_n_steps=0)
    with pytest.raises(ValueError, match=r"method='svd'"):
        OperatorNormClipper(1.0, method="svd")
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        _model().fit(*_data(rng, 4), verbose=0,
                     callbacks=[OperatorNormClipper(1.0, layers=["nope"])])
    with pytest.raises(ValueError, match="empty"):
        make_projection_fn([], 1.0)
    with pytest.raises(TypeError, match="batch_norm_data must be a tf.data.Dataset .*ndarray"):
        OperatorNormClipper(1.0, batch_norm_data=np.zeros((2, 2)))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(
                f"`batch_norm_batches` must be a positive int; "
                f"received batch_norm_batches={bad!r}.")):
            OperatorNormClipper(1.0, batch_norm_batches=bad)


def _read_events(directory):
    accumulator = event_accumulator.EventAccumulator(
        directory, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return accumulator


def test_spectrum_logger_writes_bounding_spectra_and_intervals_at_each_epoch(tmp_path, rng):
    model = _model()
    recorder = _KernelRecorder()
    log_dir = tmp_path / "logs"
    model.fit(*_data(rng, 12), batch_size=4, epochs=2, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(str(log_dir)), recorder,
                         SpectrumLogger(str(log_dir))])
    assert sorted(os.listdir(log_dir)) == [SPECTRA_SUBDIR, "train"]
    events = _read_events(str(log_dir / SPECTRA_SUBDIR))
    operators = geometry.model_geometry(model)
    tags = set(events.Tags()["tensors"])
    for op in operators:
        for prefix in ("spectrum", "sigma_max", "sigma_min", "condition_number",
                       "sigma_max_lower", "sigma_max_upper"):
            assert f"{prefix}/{op.name}" in tags
    for op in operators:
        histograms = events.Tensors(f"spectrum/{op.name}")
        assert [e.step for e in histograms] == [3, 6]
        for event in histograms:
            kernel = recorder.kernels[event.step][op.name]
            expected, layer = oracles.bounding_spectrum(op, kernel)
            buckets = tf.make_ndarray(event.tensor_proto)  # (bucket, [left, right, count])
            assert buckets[:, 2].sum() == expected.size == layer.size
            assert buckets[0, 0] == pytest.approx(expected[-1], rel=1e-5)
            assert buckets[-1, 1] == pytest.approx(expected[0], rel=1e-5)
            scalars = {prefix: float(tf.make_ndarray(
                events.Tensors(f"{prefix}/{op.name}")[[3, 6].index(event.step)].tensor_proto))
                for prefix in ("sigma_max", "sigma_min", "condition_number",
                               "sigma_max_lower", "sigma_max_upper")}
            assert scalars["sigma_max"] == pytest.approx(expected[0], rel=1e-5)
            assert scalars["sigma_min"] == pytest.approx(expected[-1], rel=1e-5)
            assert scalars["condition_number"] == pytest.approx(expected[0] / expected[-1],
                                                                rel=1e-4)
            # The certified interval holds for the real layer (float32 summaries).
            true = layer[0]
            assert scalars["sigma_max_lower"] <= true * (1 + 1e-7)
            assert true <= scalars["sigma_max_upper"] * (1 + 1e-7)
            assert scalars["sigma_max_lower"] >= 0.9 * true
    # The whole model's certified Lipschitz bound: this model is linear, so the
    # bound is at least the norm of its Jacobian (the model on basis vectors).
    logger = SpectrumLogger(str(log_dir / "again"), log_image=False, log_bounds=False)
    logger.set_model(model)
    logger.log_now(step=7)
    logged = float(tf.make_ndarray(_read_events(str(log_dir / "again" / SPECTRA_SUBDIR))
                                   .Tensors("lipschitz_upper_bound")[0].tensor_proto))
    assert logged == pytest.approx(float(logger.last_lipschitz), rel=1e-6)
    zero = model(np.zeros((1, 8, 8, 2), np.float32)).numpy()
    jacobian = reference.function_matrix(lambda x: model(x).numpy() - zero, (8, 8, 2))
    assert np.linalg.norm(jacobian, 2) <= logged * (1 + 1e-6)
    assert [e.step for e in events.Tensors("lipschitz_upper_bound")] == [3, 6]
    pytest.importorskip("matplotlib")
    images = events.Tensors("spectra")
    assert [e.step for e in images] == [3, 6]
    width, height, png = tf.make_ndarray(images[0].tensor_proto)
    assert int(width) > 100 and int(height) > 100 and png.startswith(b"\x89PNG")


def test_spectrum_logger_every_n_steps_and_layer_selection(tmp_path, rng):
    model = _model()
    logger = SpectrumLogger(str(tmp_path), every_n_epochs=None, every_n_steps=2,
                            layers=["strided"], log_image=False, log_bounds=False)
    model.fit(*_data(rng, 20), batch_size=4, epochs=1, verbose=0, callbacks=[logger])
    events = _read_events(str(tmp_path / SPECTRA_SUBDIR))
    (name,) = [op.name for op in geometry.model_geometry(model, layers=["strided"])]
    assert set(events.Tags()["tensors"]) == {f"{p}/{name}" for p in (
        "spectrum", "sigma_max", "sigma_min", "condition_number")} | {"lipschitz_upper_bound"}
    assert [e.step for e in events.Tensors(f"sigma_max/{name}")] == [2, 4]
    spectra = logger.log_now()
    assert list(spectra) == [name] and logger.last_bounds is None


def test_spectrum_logger_bad_arguments():
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        SpectrumLogger("logs", every_n_epochs=0)
    with pytest.raises(ValueError, match="every_n_steps=-2"):
        SpectrumLogger("logs", every_n_steps=-2)
    with pytest.raises(ValueError, match="log_dir=None"):
        SpectrumLogger(None)
