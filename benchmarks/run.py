r"""Runs the benchmarks: tfconvnorm side by side with the alternatives.

    python -m benchmarks.run                       # every workload (< ~10 min on 2 cores)
    python -m benchmarks.run --workloads figure1,largest_sv --repeats 3
    python -m benchmarks.run --quick --json out.json   # smaller sweeps (smoke / GPU check)
    python -m benchmarks.run --full                # no skipped points, no extrapolation
    python -m benchmarks.run --markdown-from out.json  # tables for BENCHMARKS.md

Everything runs in one process, so the ratios (method time / tfconvnorm time)
hold on a noisy machine. Per case it prints one aligned table: the median
time of each method, its ratio to tfconvnorm, and its exactness; then the
issue's targets measured on that case. `--json PATH` writes the same results
(plus the machine and versions) for machines (and, while running,
PATH.partial after every case); `--figure PATH` the log-log
plot of the published timing figure.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import workloads  # pylint: disable=g-import-not-at-top,wrong-import-position
from tfconvnorm import files  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_FIGURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figure1.png")


# ---------------------------------------------------------------------------
# Formatting.


def format_seconds(seconds):
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _format_metric(value):
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value)}"
    if value == 0:
        return "0"
    return f"{value:.2e}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}"


def _format_ratio(row):
    ratio = row.get("ratio")
    if ratio is None:
        return "-"
    text = f"{ratio:.2f}x" if ratio < 100 else f"{ratio:.0f}x"
    return text + (" (extrap.)" if row.get("extrapolated") else "")


def format_case(result):
    """An aligned text table for one case result."""
    labels = result.get("metric_labels", {})
    header = ["method", "median", "runs", "time / tfconvnorm"] + list(labels.values())
    lines = []
    for row in result["rows"]:
        if row["status"] in ("skipped", "failed"):
            cells = [row["method"], row["status"], "-", "-"] + ["-"] * len(labels)
        else:
            cells = [row["method"], format_seconds(row["median_s"]), str(row["repeats"]),
                     _format_ratio(row)]
            cells += [_format_metric(row.get("metrics", {}).get(key)) for key in labels]
        lines.append(cells)
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]

    def fmt(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"== {result['workload']}: {result['case']} ==", fmt(header),
           fmt(["-" * w for w in widths])]
    out += [fmt(cells) for cells in lines]
    for row in result["rows"]:
        extra = "; ".join(x for x in (row.get("note"), row.get("timing_note"),
                                       row.get("skip_reason"), row.get("error")) if x)
        if extra:
            out.append(f"  [{row['method']}] {extra}")
    for note in result.get("notes", []):
        out.append(f"  note: {note}")
    for target in result.get("targets", []):
        met = {True: "MET", False: "NOT MET", None: "n/a"}[target["met"]]
        value = "-" if target["value"] is None else _format_metric(target["value"])
        suffix = f" ({target['note']})" if target.get("note") else ""
        out.append(f"  target: {target['target']}: {value} "
                   f"(threshold {target['threshold']}) {met}{suffix}")
    return "\n".join(out)


def format_markdown(payload):
    """Markdown tables of a results payload (for BENCHMARKS.md)."""
    machine = payload.get("machine", {})
    out = [f"Run {payload.get('date', '?')}: `{payload.get('command', '?')}` "
           f"({'complete' if payload.get('complete') else 'INCOMPLETE'}, "
           f"{payload.get('wall_s', 0):.0f} s). Machine: {machine.get('cpu')}, "
           f"{machine.get('cpu_count')} CPUs, {machine.get('memory_gb')} GiB; GPUs: "
           f"{', '.join(machine.get('gpus') or []) or 'none'}; TF {machine.get('tensorflow')}, "
           f"Keras {machine.get('keras')}, NumPy {machine.get('numpy')}.", ""]
    for result in payload["results"]:
        labels = result.get("metric_labels", {})
        out.append(f"**{result['workload']}: {result['case']}**")
        out.append("")
        out.append("| " + " | ".join(["method", "median", "runs", "time / tfconvnorm"]
                                     + list(labels.values())) + " |")
        out.append("|---|---:|---:|---:|" + "---:|" * len(labels))
        for row in result["rows"]:
            if row["status"] in ("skipped", "failed"):
                cells = [row["status"], "-", "-"] + ["-"] * len(labels)
            else:
                cells = [format_seconds(row["median_s"]), str(row["repeats"]),
                         _format_ratio(row)]
                cells += [_format_metric(row.get("metrics", {}).get(key)) for key in labels]
            out.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        for target in result.get("targets", []):
            met = {True: "met", False: "NOT met", None: "n/a"}[target["met"]]
            value = "-" if target["value"] is None else _format_metric(target["value"])
            out.append(f"\nTarget: {target['target']}: **{value}** (threshold "
                       f"{target['threshold']}), {met}{' (' + target['note'] + ')' if target.get('note') else ''}.")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# Machine description and outputs.


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_names():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def machine_info():
    import keras  # pylint: disable=g-import-not-at-top
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return dict(
        cpu=_cpu_model(), cpu_count=os.cpu_count(), memory_gb=memory_gb,
        platform=platform.platform(), python=platform.python_version(),
        tensorflow=tf.__version__, keras=keras.__version__, numpy=np.__version__,
        tf_gpus=[d.name for d in tf.config.list_physical_devices("GPU")],
        gpus=_gpu_names())


def _json_default(value):
    """NumPy scalars and arrays, which json does not know."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_json_atomic(path, payload):
    """Writes JSON to a temporary file in the same folder, then renames it."""
    text = json.dumps(payload, indent=1, allow_nan=False, default=_json_default) + "\n"
    files.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_figure1(results, path):
    """Log-log time against channels per method, one panel per sweep (atomically)."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    import matplotlib.ticker  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

    sweeps = {}
    for result in results:
        if result["workload"] != "figure1":
            continue
        params = result["params"]
        for row in result["rows"]:
            if row["median_s"] is not None:
                sweeps.setdefault(params["sweep"], {}).setdefault(row["method"], []).append(
                    (params["channels"], row["median_s"]))
    if not sweeps:
        return None
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.2), squeeze=False)
    for ax, (sweep, methods) in zip(axes[0], sweeps.items()):
        ticks = set()
        for method, points in methods.items():
            channels, seconds = zip(*sorted(points))
            ticks.update(channels)
            ax.loglog(channels, seconds, marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(c) for c in sorted(ticks)])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("channels (c_in = c_out)")
        ax.set_ylabel("time for all singular values (s)")
        ax.set_title(sweep)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# Entry point.


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Time tfconvnorm against the published method and common estimates.")
    parser.add_argument("--workloads", default=",".join(workloads.WORKLOADS),
                        help="comma-separated subset of: %(default)s")
    parser.add_argument("--repeats", type=int, default=workloads.DEFAULT_REPEATS,
                        help="timed runs per method (median reported); default %(default)s")
    parser.add_argument("--time-cap", type=float, default=workloads.DEFAULT_TIME_CAP_S,
                        help="seconds per method and case before repeats are cut "
                             "(at least one run); default %(default)s")
    parser.add_argument("--skip-above", type=float, default=workloads.DEFAULT_SKIP_ABOVE_S,
                        help="skip sweep points predicted to take longer than this per run; "
                             "default %(default)s")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sweeps and layer sets (smoke test, GPU check)")
    parser.add_argument("--full", action="store_true",
                        help="run every point and layer: no skips, no extrapolation (slow)")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="write the results as JSON to this path")
    parser.add_argument("--figure", default=None,
                        help=f"figure 1 output path (default {DEFAULT_FIGURE}, none with "
                             "--quick); '' disables")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown-from", default=None, metavar="JSON",
                        help="run nothing: print the markdown tables of a results file")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in workloads.WORKLOADS]
    if unknown or not names:
        parser.error(f"--workloads must name some of {', '.join(workloads.WORKLOADS)}; "
                     f"got {args.workloads!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not args.time_cap > 0:
        parser.error(f"--time-cap must be > 0, got {args.time_cap}")
    if not args.skip_above > 0:
        parser.error(f"--skip-above must be > 0, got {args.skip_above}")
    args.workload_names = names
    return args


def run(names, config, on_result=None):
    """Runs the named workloads; prints each case's table as it finishes and
    passes the results so far to `on_result`."""
    results = []
    for name in names:
        config.log(f"# workload {name}")
        start = time.perf_counter()
        for result in workloads.WORKLOAD_FUNCTIONS[name](config):
            print(format_case(result), flush=True)
            print(flush=True)
            results.append(result)
            if on_result is not None:
                on_result(results)
        config.log(f"# workload {name} took {time.perf_counter() - start:.0f} s")
    return results


def main(argv=None, config=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.markdown_from:
        with open(args.markdown_from, encoding="utf-8") as f:
            payload = json.load(f)
        print(format_markdown(payload))
        return payload
    if config is None:
        config = workloads.Config()
    config.repeats, config.time_cap_s, config.skip_above_s = (
        args.repeats, args.time_cap, args.skip_above)
    config.quick, config.full, config.seed = args.quick, args.full, args.seed
    config.log = lambda message: print(message, file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    header = dict(
        date=started.isoformat(timespec="seconds"),
        command=" ".join(["python -m benchmarks.run"] + list(argv if argv is not None
                                                                else sys.argv[1:])),
        machine=machine_info(),
        config=dict(workloads=args.workload_names, repeats=args.repeats,
                    time_cap_s=args.time_cap, skip_above_s=args.skip_above,
                    quick=args.quick, full=args.full, seed=args.seed))
    # Results so far go to PATH.partial (complete: false) after every case, so
    # a run cut short (a time limit) still leaves its measurements; the final
    # file appears, complete, only at the end.
    partial = args.json_path + ".partial" if args.json_path else None
    on_result = None
    if partial:
        on_result = lambda results: write_json_atomic(
            partial, dict(header, complete=False, results=results))
    results = run(args.workload_names, config, on_result)
    payload = dict(header, complete=True, wall_s=time.perf_counter() - start, results=results)
    figure = args.figure if args.figure is not None else ("" if args.quick else DEFAULT_FIGURE)
    if figure and "figure1" in args.workload_names:
        try:
            payload["figure"] = write_figure1(results, figure)
            config.log(f"wrote {payload['figure']}")
        except ImportError as e:  # matplotlib is optional (the GPU check may lack it)
            config.log(f"figure not written: {e}")
    if args.json_path:
        write_json_atomic(args.json_path, payload)
        if os.path.exists(partial):
            os.remove(partial)
        config.log(f"wrote {args.json_path}")
    print(f"total {payload['wall_s']:.0f} s", flush=True)
    return payload


if __name__ == "__main__":
    main()
