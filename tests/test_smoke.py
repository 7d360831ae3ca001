"""The smoke set: what a user does first, end to end, through the public API and
the installed tools. `.ci/run` also runs it (`-m smoke`) in a venv with the
oldest supported TensorFlow + Keras pair (`make test-oldest`), which is how the
floor declared in setup.py is proved; the full suite runs on the newest."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

import tfconvnorm

import oracles

pytestmark = pytest.mark.smoke

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _model():
    init = keras.initializers.RandomNormal(stddev=1.0)
    inputs = keras.Input((9, 9, 2))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", kernel_initializer=init,
                            name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, padding="same", kernel_initializer=init, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, kernel_initializer=init, name="fc")(x)
    return keras.Model(inputs, outputs)


def _data(rng, n=16):
    return (rng.standard_normal((n, 9, 9, 2)).astype(np.float32),
            rng.integers(0, 3, n))


def _real_norm(layer, input_shape):
    """The Keras layer itself on every basis vector (float64): its matrix's norm."""
    return np.linalg.norm(oracles.keras_part_matrices(layer, input_shape)["kernel"][0], 2)


def test_constraint_in_fit_bounds_every_layer_and_survives_a_keras_round_trip(rng, tmp_path):
    model = _model()
    attached = tfconvnorm.constrain(model, 0.5)
    assert set(attached) == {"c1/kernel", "c2/kernel", "fc/kernel"}
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(rng)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert _real_norm(model.get_layer("c1"), (9, 9, 2)) <= 0.5
    assert _real_norm(model.get_layer("c2"), (5, 5, 4)) <= 0.5
    assert np.linalg.norm(model.get_layer("fc").kernel.numpy(), 2) <= 0.5
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    constraint = loaded.get_layer("c1").kernel.constraint
    assert isinstance(constraint, tfconvnorm.OperatorNormConstraint)
    assert constraint.padding == "same" and constraint.max_norm == 0.5
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.slow
def test_clipper_and_spectrum_logger_in_fit(rng, tmp_path):
    model = _model()
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(rng)
    clipper = tfconvnorm.OperatorNormClipper(0.5, every_n_steps=2, method="alternating")
    logger = tfconvnorm.SpectrumLogger(str(tmp_path / "logs"))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[clipper, logger])
    assert clipper.last_projection["step"] == 4
    for name in ("c1", "c2"):
        bounds = tfconvnorm.model_geometry(model, layers=[name])[0]
        assert float(tfconvnorm.conv_operator_norm(
            bounds.to_spectral(bounds.variable), **bounds.geometry.spectral_kwargs())) <= 0.5 * (
                1 + 1e-4)
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_lipschitz_bound_is_above_an_empirical_lower_bound(rng):
    model = _model()
    bound = float(tfconvnorm.lipschitz_bound(model))
    x = rng.standard_normal((8, 9, 9, 2)).astype(np.float32)
    lower = float(tfconvnorm.empirical_lower_bound(model, x, pairs_steps=5, jacobian_iterations=5))
    assert 0 < lower <= bound


def _tool(name, *args, cwd):
    """An installed console script of the running interpreter's environment."""
    script = pathlib.Path(sys.executable).parent / name
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_tools_help_lists_their_own_flags_and_starts_quietly(tmp_path):
    train = _tool("tfconvnorm-train", "--help", cwd=tmp_path)
    assert "--clip_to" in train.stdout and "Operator-norm bound for every conv" in train.stdout
    analyze = _tool("tfconvnorm-analyze", "--help", cwd=tmp_path)
    assert "--checkpoint" in analyze.stdout and "A .keras file" in analyze.stdout
    # The checkout's script, as the README runs it, the same way.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    checkout = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
    assert "--clip_to" in checkout.stdout
    for done in (train, analyze, checkout):
        # absl's --help exits 1 without running anything.
        assert done.returncode in (0, 1), done.stderr[-2000:]
        assert "oneDNN" not in done.stderr and "InitializeLog" not in done.stderr, done.stderr


@pytest.mark.slow
def test_analyze_tool_on_a_keras_file_and_train_script_short_run(tmp_path):
    from absl import flags  # pylint: disable=import-outside-toplevel
    from tfconvnorm.cli import analyze  # pylint: disable=import-outside-toplevel
    model = _model()
    model.save(tmp_path / "small.keras")
    # The tool's flags and main in this process (its console script starts in
    # the help test above): a new TensorFlow start costs more than the analysis.
    flag_values = flags.FlagValues()
    analyze.define_flags(flag_values)
    flag_values(["tfconvnorm-analyze", f"--checkpoint={tmp_path / 'small.keras'}",
                 f"--output_dir={tmp_path / 'out'}", "--bound_iterations=4"])
    analyze.main(["tfconvnorm-analyze"], flag_values)
    assert sorted(os.listdir(tmp_path / "out")) == ["spectra.npz", "spectra.png", "summary.csv"]
    # The checkout's train.py, as the README runs it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--dataset=digits", "--depth=8", "--epochs=1",
         "--max_steps=2", "--clip_to=1.0", "--clip_every=1", "--spectra_every_n_epochs=0",
         "--bn_recalibration_batches=1", "--progress=none", f"--model_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2
    assert results["max_conv_operator_norm"] <= 1.0 * (1 + 1e-4)


def test_clipper_counts_the_steps_of_a_mixed_precision_optimizer(rng):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv",
                                kernel_initializer=keras.initializers.RandomNormal(stddev=1.0)),
            keras.layers.Flatten(), keras.layers.Dense(2, name="fc", dtype="float32")])
        model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
        clipper = tfconvnorm.OperatorNormClipper(0.5, every_n_steps=1, method="alternating")
        # Early steps overflow in float16 and are skipped (no step, no clip).
        model.fit(rng.standard_normal((96, 8, 8, 3)), rng.standard_normal((96, 2)),
                  batch_size=4, epochs=1, verbose=0, callbacks=[clipper])
        assert clipper.last_projection is not None and clipper.last_projection["step"] > 0
        op = tfconvnorm.model_geometry(model, layers=["conv"])[0]
        assert op.variable.dtype == "float32"
        assert float(tfconvnorm.conv_operator_norm(
            op.to_spectral(op.variable), **op.geometry.spectral_kwargs())) <= 0.5 * (1 + 1e-4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
