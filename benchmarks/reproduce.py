r"""The paper's experiment (Sedghi, Gupta & Long, ICLR 2019, Figs. 2-4) at small scale.

    python -m benchmarks.reproduce --output_dir=DIR            # digits, 4 arms x 3 seeds
    python -m benchmarks.reproduce --output_dir=DIR --quick    # 2 arms, 1 seed, 2 epochs
    python -m benchmarks.reproduce --output_dir=DIR --dataset=cifar10 --data_dir=TFDS_DIR

A baseline and runs with every conv projected onto the operator-norm ball of
radius `--clip_to` (a sweep, as in the paper's Fig. 3) with the paper's
protocol: the published single clip (`clip_method="paper"`) every 100 steps,
conv kernels only. Each arm runs with every seed through
`tfconvnorm.training.train_and_evaluate` (what `train.py` runs), one run
directory each, so an interrupted sweep resumes where it stopped.

Written to DIR:
    runs/ARM/seedK/   each run's directory (history.json, results.json, model.keras, ...)
    runs.csv          one row per run: test error, wall and training time, norms, bound
    summary.csv       one row per arm: test error mean and std over seeds, times
    results.json      all of the above, the protocol, the command, machine and date
    table.md          the summary as a markdown table
    fig2.png          training loss and test error against epochs (mean and range per arm)
    fig4.png          test error against training time

On digits the training set is reduced to its first `--train_examples` images
(a fixed split), where regularisation has room to matter. "Test error" during
training is Keras' per-epoch validation on the test split; the final one is
after the run's last projection and BN re-estimation, as `train.py` reports.
"""

import argparse
import csv
import datetime
import io
import math
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from tfconvnorm import files  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfconvnorm import training  # pylint: disable=g-import-not-at-top,wrong-import-position

BASELINE = "baseline"
# What is the same in every arm: the paper's protocol on each dataset.
PROTOCOLS = {
    # 300 training images at batch 32: 9 steps per epoch; 100 epochs = 900 steps,
    # a projection every 100 steps (the paper's interval) = 9 projections.
    "digits": dict(dataset="digits", depth=20, train_examples=300, batch_size=32, epochs=100),
    # The paper's run: ResNet-32 V2, 182 epochs at batch 128 (the Model Garden recipe).
    "cifar10": dict(dataset="cifar10", depth=32, batch_size=128, epochs=training.RECIPE_EPOCHS),
}
COMMON = dict(clip_every=100, clip_method="paper", final_clip_method="paper",
              spectra_every_n_epochs=0, checkpoints_to_keep=1, progress="none")
QUICK = dict(depth=8, train_examples=64, batch_size=32, epochs=2, clip_every=2)
DEFAULT_CLIP_VALUES = (0.5, 1.0, 2.0)
DEFAULT_SEEDS = 3
CSV_RUN_FIELDS = ("arm", "clip_to", "seed", "test_error", "test_loss", "final_train_loss",
                  "wall_time_s", "train_time_s", "steps", "max_conv_operator_norm",
                  "lipschitz_upper_bound")
CSV_ARM_FIELDS = ("arm", "clip_to", "runs", "test_error_mean", "test_error_std",
                  "test_error_min", "test_error_max", "wall_time_mean_s", "train_time_mean_s",
                  "max_conv_operator_norm_mean", "lipschitz_upper_bound_mean")


def arm_name(clip_to):
    return BASELINE if clip_to is None else f"clip{clip_to:g}"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where runs, tables and figures go")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run: baseline and clip_to=1, 1 seed, 2 epochs, ResNet-8")
    parser.add_argument("--dataset", default="digits", choices=sorted(PROTOCOLS))
    parser.add_argument("--data_dir", default=None, help="TFDS data directory (cifar10)")
    parser.add_argument("--manual_dir", default=None,
                        help="folder holding cifar-10-binary.tar.gz (cifar10, offline)")
    parser.add_argument("--clip_to", default=None,
                        help="comma-separated bounds of the clipped arms (default 0.5,1,2; "
                             "quick: 1)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per arm (default {DEFAULT_SEEDS}; quick: 1)")
    parser.add_argument("--epochs", type=int, default=None, help="override the protocol's epochs")
    parser.add_argument("--strategy", default="default", choices=training.STRATEGIES,
                        help="tf.distribute strategy of every run (e.g. mirrored on GPUs)")
    args = parser.parse_args(argv)
    try:
        clips = (DEFAULT_CLIP_VALUES if args.clip_to is None and not args.quick
                 else (1.0,) if args.clip_to is None
                 else tuple(float(c) for c in args.clip_to.split(",")))
    except ValueError:
        parser.error(f"--clip_to must be comma-separated numbers, got {args.clip_to!r}")
    if not clips or not all(0 < c < math.inf for c in clips):
        parser.error(f"--clip_to must be finite numbers > 0, got {args.clip_to!r}")
    args.clip_values = clips
    if args.seeds is None:
        args.seeds = 1 if args.quick else DEFAULT_SEEDS
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir must be a directory, but {args.output_dir!r} is a file")
    return args


def protocol(args):
    """The TrainConfig keyword arguments every arm shares."""
    settings = dict(PROTOCOLS[args.dataset], **COMMON, strategy=args.strategy,
                    data_dir=args.data_dir, manual_dir=args.manual_dir)
    if args.quick:
        settings.update(QUICK)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    return settings


def run_all(args):
    """Trains every (arm, seed) not yet finished; returns [(arm, clip_to, seed, dir)]."""
    settings = protocol(args)
    runs = []
    for clip_to in (None,) + tuple(args.clip_values):
        for seed in range(args.seeds):
            run_dir = os.path.join(args.output_dir, "runs", arm_name(clip_to), f"seed{seed}")
            config = training.TrainConfig(clip_to=clip_to, seed=seed, **settings)
            training.validate_config(config)
            training.check_model_dir(config, run_dir)
            results = _finished(config, run_dir)
            if results is None:
                started = time.time()
                results = training.train_and_evaluate(config, run_dir)
                done = f"{time.time() - started:.0f} s"
            else:
                done = "finished earlier"
            print(f"{arm_name(clip_to)} seed {seed}: test error {results['test_error']:.4f} "
                  f"({done})", flush=True)
            runs.append((arm_name(clip_to), clip_to, seed, run_dir))
    return runs


def _finished(config, run_dir):
    """The results of a run already completed with this config, else None.
    Not trained again: a second `train_and_evaluate` would rewrite its
    results.json with the wall time of the re-evaluation alone."""
    path = os.path.join(run_dir, training.RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    results = files.read_json(path)
    if (results.get("flags") != config.to_json_dict()
            or results.get("epochs_completed") != config.epochs):
        return None
    return results


def collect(runs):
    """Per-run rows and per-epoch histories, read back from the run directories."""
    rows, histories = [], {}
    for arm, clip_to, seed, run_dir in runs:
        results = files.read_json(os.path.join(run_dir, training.RESULTS_FILE))
        history = files.read_json(os.path.join(run_dir, training.HISTORY_FILE))["epochs"]
        histories.setdefault(arm, []).append(history)
        rows.append(dict(arm=arm, clip_to=clip_to, seed=seed,
                         test_error=results["test_error"], test_loss=results["test_loss"],
                         final_train_loss=history[-1]["loss"],
                         wall_time_s=results["wall_time_s"],
                         train_time_s=history[-1]["train_time_s"], steps=results["steps"],
                         max_conv_operator_norm=results["max_conv_operator_norm"],
                         lipschitz_upper_bound=results["lipschitz_upper_bound"],
                         run_dir=run_dir))
    return rows, histories


def _std(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarize(rows):
    arms = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        errors = [r["test_error"] for r in mine]
        arms.append(dict(
            arm=arm, clip_to=mine[0]["clip_to"], runs=len(mine),
            test_error_mean=float(np.mean(errors)), test_error_std=_std(errors),
            test_error_min=min(errors), test_error_max=max(errors),
            wall_time_mean_s=float(np.mean([r["wall_time_s"] for r in mine])),
            train_time_mean_s=float(np.mean([r["train_time_s"] for r in mine])),
            max_conv_operator_norm_mean=float(np.mean([r["max_conv_operator_norm"] for r in mine])),
            lipschitz_upper_bound_mean=float(np.mean([r["lipschitz_upper_bound"]
                                                      for r in mine]))))
    return arms


def markdown_table(arms):
    lines = ["| arm | runs | test error (mean ± std) | min–max | wall time / run | "
             "largest conv norm | Lipschitz bound |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for a in arms:
        std = "n/a" if a["test_error_std"] is None else f"{100 * a['test_error_std']:.2f}"
        lines.append(
            f"| {a['arm']} | {a['runs']} | {100 * a['test_error_mean']:.2f}% ± {std} | "
            f"{100 * a['test_error_min']:.2f}–{100 * a['test_error_max']:.2f}% | "
            f"{a['wall_time_mean_s']:.0f} s | {a['max_conv_operator_norm_mean']:.3g} | "
            f"{a['lipschitz_upper_bound_mean']:.3g} |")
    return "\n".join(lines) + "\n"


def _curves(histories, x_key, y_key):
    """Per arm: (x mean, y mean, y min, y max) over seeds, on the epochs all runs have."""
    out = {}
    for arm, runs in histories.items():
        epochs = min(len(h) for h in runs)
        x = np.mean([[e[x_key] for e in h[:epochs]] for h in runs], axis=0)
        y = np.array([[y_key(e) for e in h[:epochs]] for h in runs])
        out[arm] = (x, y.mean(0), y.min(0), y.max(0))
    return out


def _epoch(e):
    return e["epoch"]


def write_figures(histories, output_dir, title):
    """fig2.png (loss and test error vs epoch) and fig4.png (test error vs time):
    ({name: path}, the plotted curves)."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    def test_error(e):
        return 1.0 - e["val_accuracy"]

    def band(ax, curves, xlabel, ylabel):
        for arm, (x, mean, low, high) in curves.items():
            line, = ax.plot(x, mean, label=arm)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()

    curves = {"fig2_loss": _curves(histories, "epoch", lambda e: e["loss"]),
              "fig2_test_error": _curves(histories, "epoch", test_error),
              "fig4_test_error": _curves(histories, "train_time_s", test_error)}
    paths = {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    band(left, curves["fig2_loss"], "epoch", "training loss")
    left.set_yscale("log")
    band(right, curves["fig2_test_error"], "epoch", "test error")
    right.set_yscale("log")  # the arms differ by a point or two of error: a linear axis hides it
    fig.suptitle(f"{title}: mean over seeds, band = min..max (cf. the paper's Fig. 2)")
    fig.tight_layout()
    paths["fig2"] = _save(fig, os.path.join(output_dir, "fig2.png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    band(ax, curves["fig4_test_error"], "training time (s)", "test error")
    ax.set_yscale("log")
    ax.set_title(f"{title} (cf. the paper's Fig. 4)")
    fig.tight_layout()
    paths["fig4"] = _save(fig, os.path.join(output_dir, "fig4.png"))
    plt.close(fig)
    # What was plotted, for results.json: {curve: {arm: {x, mean, min, max}}}.
    data = {name: {arm: dict(zip(("x", "mean", "min", "max"), (v.tolist() for v in values)))
                   for arm, values in per_arm.items()} for name, per_arm in curves.items()}
    return paths, data


def _save(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    files.atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def _write_csv(path, rows, fields):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8")))
    return path


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = run_all(args)
    rows, histories = collect(runs)
    arms = summarize(rows)
    settings = protocol(args)
    title = (f"ResNet-{settings['depth']} V2 on {args.dataset}"
             + (f" ({settings['train_examples']} training images)"
                if settings.get("train_examples") else ""))
    out = args.output_dir
    figures, curves = write_figures(histories, out, title)
    table = markdown_table(arms)
    files.atomic_write(os.path.join(out, "table.md"), lambda f: f.write(table.encode("utf-8")))
    _write_csv(os.path.join(out, "runs.csv"), rows, CSV_RUN_FIELDS)
    _write_csv(os.path.join(out, "summary.csv"), arms, CSV_ARM_FIELDS)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    files.write_json(os.path.join(out, "results.json"), dict(
        command="python -m benchmarks.reproduce " + " ".join(
            sys.argv[1:] if argv is None else argv),
        started=started.isoformat(timespec="seconds"),
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpus=os.cpu_count(), tensorflow=tf.__version__,
                     gpus=[d.name for d in tf.config.list_physical_devices("GPU")]),
        protocol=settings, clip_values=list(args.clip_values), seeds=args.seeds,
        runs=rows, arms=arms, figures=figures, curves=curves))
    print("\n" + table)
    print(f"Wrote {out}/results.json, runs.csv, summary.csv, table.md, fig2.png, fig4.png")
    return arms


if __name__ == "__main__":
    main()
