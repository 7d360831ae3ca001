"""MirroredStrategy over two logical CPU devices: constraint and clipper.

Logical devices must be configured before TensorFlow runs any op, which the
other tests in the same process have already done; so the training runs in a
fresh Python subprocess that reports back as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import json
    import os
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import tfconvnorm
    from tfconvnorm import geometry
    from tfconvnorm.callbacks import OperatorNormClipper
    from tfconvnorm.constraints import constrain

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        inputs = keras.Input((8, 8, 2))
        x = keras.layers.Conv2D(4, 3, padding="same", name="constrained")(inputs)
        x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="clipped")(x)
        x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(2, name="fc")(x)
        model = keras.Model(inputs, outputs)
        constrain(model, 0.5, layers=["constrained", "depthwise"])
        model.compile(keras.optimizers.Adam(0.05), "mse", jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 8, 8, 2)).astype(np.float32)
    y = rng.standard_normal((48, 2)).astype(np.float32)
    clipper = OperatorNormClipper(0.3, every_n_steps=2, layers=["clipped"],
                                  method="alternating")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[clipper])
    result = {"replicas": strategy.num_replicas_in_sync,
              "steps": int(model.optimizer.iterations.numpy()),
              "clipper_step": clipper.last_projection["step"], "kernels": {}}
    for op in geometry.model_geometry(model):
        replicas = [np.asarray(v) for v in op.variable.value.values]
        kernel = op.to_spectral(tf.constant(replicas[0]))
        result["kernels"][op.layer.name] = {
            "copies": len(replicas),
            "identical": all(np.array_equal(replicas[0], r) for r in replicas[1:]),
            "finite": bool(np.all(np.isfinite(replicas[0]))),
            "norm": float(tfconvnorm.conv_operator_norm(kernel, **op.geometry.spectral_kwargs())),
        }
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.slow
def test_mirrored_strategy_constraint_and_clipper(tmp_path):
    script = tmp_path / "distributed_run.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["replicas"] == 2
    # 48 samples, global batch 8: 6 steps; the clipper's last projection at step 6.
    assert result["steps"] == 6 and result["clipper_step"] == 6
    kernels = result["kernels"]
    assert set(kernels) == {"constrained", "clipped", "depthwise", "fc"}
    for name, info in kernels.items():
        assert info["copies"] == 2 and info["identical"] and info["finite"], (name, info)
    assert kernels["constrained"]["norm"] <= 0.5 * (1 + 1e-4)
    assert kernels["depthwise"]["norm"] <= 0.5 * (1 + 1e-4)
    assert kernels["clipped"]["norm"] <= 0.3 * (1 + 1e-4)


_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    index, ports, model_dir = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index}})
    from tfconvnorm import training
    config = training.TrainConfig(
        dataset="digits", depth=8, epochs=1, batch_size=32, clip_to=0.5, clip_every=4,
        strategy="multi_worker_mirrored", spectra_every_n_epochs=0, progress="none",
        bn_recalibration_batches=2, max_steps=10)
    results = training.train_and_evaluate(config, model_dir)
    print("RESULTS " + json.dumps(results))
""")


def _free_port():
    import socket  # pylint: disable=import-outside-toplevel
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_training_on_two_local_workers(tmp_path):
    """Two worker processes on 127.0.0.1 train digits with clipping every 4 steps:
    both finish, end with the same kernels (the same certified norm of every
    layer, float for float), within the bound, and only the chief writes the
    run's outputs. (BatchNormalization statistics are re-estimated by each
    worker on its own, so the workers' Lipschitz bounds may differ.)"""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    ports = f"{_free_port()},{_free_port()}"
    model_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    workers = [subprocess.Popen([sys.executable, str(script), str(i), ports, str(model_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for i in range(2)]
    outputs = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=400)
            assert worker.returncode == 0, err[-3000:]
            outputs.append(json.loads(out.split("RESULTS ", 1)[1]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    chief, other = outputs
    assert chief["steps"] == other["steps"] == 10
    assert chief["operator_norms"] == other["operator_norms"]
    assert all(len(r["operator_norms"]) == 11 for r in outputs)  # 10 convs and the logits
    conv = [n for name, n in chief["operator_norms"].items()
            if chief["operator_kinds"][name] != "dense"]
    assert max(conv) <= 0.5 * (1 + 1e-4)
    assert sorted(os.listdir(model_dir)) == ["checkpoints", "config.json", "history.json", "logs",
                                             "model.keras", "results.json"]
    assert chief["model_path"] == str(model_dir / "model.keras")
    assert not other["model_path"].startswith(str(model_dir))
