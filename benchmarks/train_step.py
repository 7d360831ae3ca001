"""What `constrain()` costs inside `fit`, with XLA on and off, and how tight the
matmul path's certified bound is.

  python -m benchmarks.train_step --json benchmarks/results-train_step.json

Rows: the median batch-128 ResNet-32 V2 training step in `fit` (per-batch wall
time from a callback, warm-up batches dropped) for plain / constrained models,
XLA on / off, in interleaved rounds (this CPU's step time drifts from round to
round, so only medians over rounds of one run are compared); and per layer the
ratio of `conv_operator_norm_upper_bound` (float32) to the exact float64 norm on
ResNet-32 and MobileNetV2 (He init).
"""

import argparse
import json
import time

import keras
import numpy as np
import tensorflow as tf

import tfconvnorm
from tfconvnorm import geometry
from benchmarks.workloads import resnet32_model


class _StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def _model(constrained, jit_compile):
    model = resnet32_model(0)
    if constrained:
        tfconvnorm.constrain(model, 1.0)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    return model


def step_times(rounds, steps, batch=128):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * steps, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch * steps)
    configs = [(c, j) for j in (True, False) for c in (False, True)]
    models = {config: _model(*config) for config in configs}
    for model in models.values():  # compile / trace outside the timed rounds
        model.fit(x[:batch * 2], y[:batch * 2], batch_size=batch, epochs=1, verbose=0)
    medians = {config: [] for config in configs}
    for _ in range(rounds):
        for config in configs:
            timer = _StepTimes()
            models[config].fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer])
            medians[config].append(float(np.median(timer.times[1:])))
    rows = {}
    for constrained, jit in configs:
        key = f"{'constrained' if constrained else 'plain'}_{'xla' if jit else 'no_xla'}"
        rows[key] = dict(round_medians_s=medians[(constrained, jit)],
                         median_s=float(np.median(medians[(constrained, jit)])))
    for mode in ("xla", "no_xla"):
        rows[f"overhead_{mode}"] = (rows[f"constrained_{mode}"]["median_s"]
                                    / rows[f"plain_{mode}"]["median_s"] - 1)
    rows["plain_xla_over_no_xla"] = rows["plain_xla"]["median_s"] / rows["plain_no_xla"]["median_s"]
    return rows


def clipper_cost(rounds, steps, batch=128, every=100):
    """`OperatorNormClipper(1.0, every_n_steps=1)` (the paper's clip, norms
    logged: the defaults) inside `fit` against plain `fit`, XLA on and off: the
    cost of one clip as users run it, and that cost spread over `every`
    steps (the paper's protocol: every 100)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * steps, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch * steps)
    rows = {}
    for jit in (True, False):
        models = {clip: _model(False, jit) for clip in (False, True)}
        clippers = {False: [], True: [tfconvnorm.OperatorNormClipper(1.0, every_n_steps=1)]}
        for clip, model in models.items():
            model.fit(x[:batch * 2], y[:batch * 2], batch_size=batch, epochs=1, verbose=0,
                      callbacks=clippers[clip])
        medians = {False: [], True: []}
        for _ in range(rounds):
            for clip, model in models.items():
                timer = _StepTimes()  # last: its batch end comes after the clipper's
                model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                          callbacks=clippers[clip] + [timer])
                medians[clip].append(float(np.median(timer.times[1:])))
        plain, clipped = (float(np.median(medians[c])) for c in (False, True))
        mode = "xla" if jit else "no_xla"
        rows[f"plain_step_s_{mode}"] = plain
        rows[f"step_with_clip_s_{mode}"] = clipped
        rows[f"one_clip_over_step_{mode}"] = (clipped - plain) / plain
        rows[f"clip_every_{every}_overhead_{mode}"] = (clipped - plain) / (every * plain)
    return rows


def bound_ratios(model):
    ratios = []
    for op in geometry.model_geometry(model, kinds=tfconvnorm.CONV_KINDS):
        kernel = np.asarray(op.to_spectral(op.variable.numpy()))
        args = op.geometry.spectral_kwargs()
        exact = float(tfconvnorm.conv_operator_norm(kernel.astype(np.float64), **args))
        bound = float(tfconvnorm.conv_operator_norm_upper_bound(kernel.astype(np.float32),
                                                                **args))
        ratios.append(bound / exact)
    return dict(layers=len(ratios), min=min(ratios), median=float(np.median(ratios)),
                max=max(ratios), below_exact=sum(r < 1 for r in ratios))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    results = dict(
        bound_ratio_resnet32=bound_ratios(resnet32_model(0)),
        bound_ratio_mobilenetv2=bound_ratios(keras.applications.MobileNetV2(
            input_shape=(96, 96, 3), weights=None)),
        step=step_times(args.rounds, args.steps),
        tensorflow=tf.__version__, keras=keras.__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
