"""The training-time API under Keras' JAX and PyTorch backends.

The backend is fixed when Keras is imported, so each runs in a subprocess
(`tests/backend_worker.py`, which holds the checks and their oracles); this
process is the TensorFlow side of the cross-backend `.keras` round trips.
Neither backend is optional here: `make test` and CI install both, and a
missing one fails these tests instead of skipping them.
"""

import os
import pathlib
import subprocess
import sys

import keras
import pytest

import backend_worker
import tfconvnorm
from tfconvnorm import geometry

WORKER = pathlib.Path(__file__).with_name("backend_worker.py")
BACKENDS = ("jax", "torch")


def _run(backend, check, out_dir, *args, env=None, timeout=600):
    environment = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    result = subprocess.run([sys.executable, str(WORKER), check, str(out_dir), *map(str, args)],
                            env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{check} under KERAS_BACKEND={backend} failed:\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-6000:]}")
    assert (pathlib.Path(out_dir) / f"{check}.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_constraint_clipper_logger_and_bn_under_backend(backend, tmp_path):
    # A .keras file with constraints saved here (TensorFlow) loads there ...
    model = backend_worker.every_kind_model()
    tfconvnorm.constrain(model, 0.25)
    model.save(tmp_path / "from_tensorflow.keras")
    _run(backend, "api", tmp_path, tmp_path / "from_tensorflow.keras")
    # ... and theirs here, with constraints that act.
    saved = keras.models.load_model(tmp_path / "constrained.keras")
    constraints = [getattr(op.layer, op.constraint_attribute)
                   for op in geometry.model_geometry(saved)]
    assert all(isinstance(c, tfconvnorm.OperatorNormConstraint) and c.max_norm == 0.5
               for c in constraints)
    saved.compile(keras.optimizers.SGD(0.5), "mse")
    saved.fit(*backend_worker.data(8, seed=4), epochs=1, verbose=0)
    assert max(backend_worker.true_norms(saved).values()) <= 0.5 * backend_worker.SLACK


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_runs_under_backend(backend, tmp_path):
    _run(backend, "train", tmp_path)
    results = tfconvnorm.files.read_json(tmp_path / "run" / "results.json")
    assert results["backend"] == backend
    # The analyser (TensorFlow) reads the run's model and per-epoch weights.
    from tfconvnorm import checkpoints  # pylint: disable=import-outside-toplevel
    from tfconvnorm.checkpoints import architectures  # pylint: disable=import-outside-toplevel
    for path in (results["model_path"], results["latest_checkpoint"]):
        read = checkpoints.read(path, architecture=architectures.CIFAR_ARCHITECTURE if path.endswith(".h5")
                                else None)
        assert len(read.records) == len(geometry.model_geometry(read.model)) > 0


@pytest.mark.slow
def test_jax_data_parallel_over_two_host_devices(tmp_path):
    _run("jax", "data_parallel", tmp_path,
         env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})


def test_every_backend_is_installed():
    # CI must run the tests above, not skip them for a missing package.
    for module in BACKENDS:
        __import__(module)
