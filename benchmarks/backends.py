"""What `constrain()` costs inside `fit` under each Keras backend, side by side.

  python -m benchmarks.backends --json benchmarks/recorded/backends-DATE.json

Per backend (TensorFlow, JAX, PyTorch; each in its own subprocess, since Keras
fixes the backend at import, run one after the other with nothing else
running): the median batch-128 ResNet-32 V2 training step in `fit` (per-batch
wall time from a callback, warm-up batches dropped) of the plain model and of
`constrain(model, 1.0)` (the default "rescale": the matmul path's certified
bound every step), in interleaved rounds, compiled as each backend compiles by
default (`jit_compile="auto"`: XLA under TensorFlow only with a GPU, `jax.jit`
under JAX, eager under PyTorch). The overhead is constrained / plain - 1 of
the medians over rounds.
"""

import argparse
import json
import os
import subprocess
import sys
import time

BACKENDS = ("tensorflow", "jax", "torch")


def measure(rounds, steps, batch=128):
    """The rows of the backend this process runs (KERAS_BACKEND)."""
    import keras  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from benchmarks.train_step import _StepTimes, _model  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * steps, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch * steps)
    models = {name: _model(name == "constrained", "auto") for name in ("plain", "constrained")}
    for model in models.values():  # compile / trace outside the timed rounds
        model.fit(x[:batch * 2], y[:batch * 2], batch_size=batch, epochs=1, verbose=0)
    medians = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            timer = _StepTimes()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer])
            medians[name].append(float(np.median(timer.times[1:])))
    rows = {name: dict(round_medians_s=values, median_s=float(np.median(values)))
            for name, values in medians.items()}
    rows["overhead"] = rows["constrained"]["median_s"] / rows["plain"]["median_s"] - 1
    rows["jit_compile"] = str(models["plain"].jit_compile)
    rows["keras"] = keras.__version__
    backend = keras.backend.backend()
    rows["backend_version"] = __import__(backend).__version__
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.rounds, args.steps)))
        return
    results = {}
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        out = subprocess.run([sys.executable, "-m", "benchmarks.backends", "--worker",
                              f"--rounds={args.rounds}", f"--steps={args.steps}"],
                             env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{backend} failed:\n{out.stderr[-4000:]}")
        results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
        print(backend, json.dumps(results[backend]), flush=True)
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
