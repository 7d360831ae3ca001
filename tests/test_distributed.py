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
