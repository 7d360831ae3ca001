r"""How tight is the certified Lipschitz bound of a trained model?

    python -m benchmarks.lipschitz_certificate MODEL.keras [MODEL.keras ...] \
        [--dataset=digits] [--examples=32] [--json=PATH]

For each saved model: `tfconvnorm.lipschitz_bound` (certified, inference mode)
against `tfconvnorm.empirical_lower_bound` started from `--examples` images of
the dataset's test split (the largest ||f(x) - f(y)|| / ||x - y|| and Jacobian
norm that gradient ascent and power iteration find). The true Lipschitz
constant lies between the two; their ratio is at most how loose the
certificate is. Prints a markdown table (and writes JSON with `--json`).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help=".keras model files")
    parser.add_argument("--dataset", default="digits", help="dataset of the starting inputs")
    parser.add_argument("--data_dir", default=None, help="TFDS data directory")
    parser.add_argument("--examples", type=int, default=32,
                        help="test images the empirical search starts from")
    parser.add_argument("--steps", type=int, default=50,
                        help="gradient-ascent steps and Jacobian power iterations")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"--examples must be >= 1, got {args.examples}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    for path in args.models:
        if not os.path.isfile(path):
            parser.error(f"model file not found: {path!r}")
    return args


def certificate_rows(models, inputs, steps=50):
    """[{model, bound, empirical_lower, ratio, top contributors, seconds}] per model path."""
    import keras  # pylint: disable=import-outside-toplevel
    import tfconvnorm  # pylint: disable=import-outside-toplevel
    rows = []
    for path in models:
        model = keras.saving.load_model(path)
        started = time.time()
        bound = tfconvnorm.lipschitz_bound(model)
        bound_s = time.time() - started
        started = time.time()
        lower = tfconvnorm.empirical_lower_bound(model, inputs, pairs_steps=steps,
                                                 jacobian_iterations=steps)
        rows.append(dict(model=path, lipschitz_upper_bound=float(bound),
                         empirical_lower_bound=lower, ratio=float(bound) / lower,
                         top_contributors={f.name: f.factor for f in bound.top_contributors(3)},
                         bound_s=bound_s, empirical_s=time.time() - started))
    return rows


def markdown(rows):
    lines = ["| model | certified upper bound | empirical lower bound | ratio | "
             "largest factors |", "|---|---:|---:|---:|---|"]
    for r in rows:
        top = ", ".join(f"{k} {v:.3g}" for k, v in r["top_contributors"].items())
        lines.append(f"| {r['model']} | {r['lipschitz_upper_bound']:.4g} | "
                     f"{r['empirical_lower_bound']:.4g} | {r['ratio']:.3g} | {top} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import numpy as np  # pylint: disable=import-outside-toplevel
    from tfconvnorm import files  # pylint: disable=import-outside-toplevel
    from tfconvnorm.models import cifar_input  # pylint: disable=import-outside-toplevel
    data, _ = cifar_input.build_dataset(args.dataset, "test", args.examples,
                                        data_dir=args.data_dir)
    images, _ = next(iter(data))
    rows = certificate_rows(args.models, np.asarray(images), steps=args.steps)
    print(markdown(rows))
    if args.json:
        files.write_json(args.json, dict(dataset=args.dataset, examples=int(images.shape[0]),
                                         steps=args.steps, rows=rows))
    return rows


if __name__ == "__main__":
    main()
