r"""The offline demo: train ResNet-20 V2 on digits with operator-norm clipping, then analyse it.

    python demo.py --output_dir=demo_output

Runs on a 2-core CPU in a few minutes without any download: scikit-learn's
bundled 8x8 digits (upsampled to 32x32) stand in for CIFAR-10. It trains
with every conv projected onto the operator-norm ball of radius --clip_to
every --clip_every steps (the published protocol), writes TensorBoard logs
(loss, accuracy, learning rate, every layer's spectrum), then computes the
exact singular values of every layer of the trained model with analyze.py
and leaves a spectrum plot. It prints where everything went.

Uses argparse, not absl flags: analyze.py defines absl flags at import.
"""

import argparse
import os
import sys

DEMO_DATASET = "digits"
DEMO_DEPTH = 20
DEMO_EPOCHS = 30
DEMO_CLIP_TO = 1.0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output",
                        help="where the run and the analysis go (default: demo_output)")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="training epochs")
    parser.add_argument("--clip_to", type=float, default=DEMO_CLIP_TO,
                        help="operator-norm bound of every conv")
    parser.add_argument("--depth", type=int, default=DEMO_DEPTH, help="ResNet V2 depth (6n+2)")
    parser.add_argument("--max_steps", type=int, default=None, help="stop early (smoke runs)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    if not args.clip_to > 0:
        parser.error(f"--clip_to must be > 0, got {args.clip_to}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output_dir must be a directory, but {args.output_dir!r} is a file")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Imported here so that --help answers at once.
    from tfconvnorm import training as train  # pylint: disable=import-outside-toplevel

    model_dir = os.path.join(args.output_dir, "model_dir")
    analysis_dir = os.path.join(args.output_dir, "analysis")
    config = train.TrainConfig(dataset=DEMO_DATASET, depth=args.depth, epochs=args.epochs,
                               clip_to=args.clip_to, max_steps=args.max_steps)
    try:
        train.validate_config(config)
        train.check_model_dir(config, model_dir)
    except ValueError as e:
        sys.exit(f"demo.py: {e}")
    print(f"Training ResNet-{args.depth} V2 on {DEMO_DATASET} for {args.epochs} epochs, every conv "
          f"projected to operator norm <= {args.clip_to:g} every {config.clip_every} steps "
          f"(equivalent to: python train.py --dataset={DEMO_DATASET} --depth={args.depth} "
          f"--epochs={args.epochs} --clip_to={args.clip_to:g} --model_dir={model_dir})", flush=True)
    results = train.train_and_evaluate(config, model_dir)
    print(f"\nTest accuracy {results['test_accuracy']:.4f}; largest conv operator norm "
          f"{results['max_conv_operator_norm']:.5f} (bound {args.clip_to:g}); "
          f"{results['wall_time_s']:.0f} s of training.\n", flush=True)

    from tfconvnorm import analysis as analyze  # pylint: disable=import-outside-toplevel
    analysis = analyze.analyse(results["model_path"], analysis_dir)

    print("\nWhere everything went:")
    print(f"  run directory:  {model_dir}")
    print(f"  results:        {os.path.join(model_dir, train.RESULTS_FILE)}")
    print(f"  final model:    {results['model_path']}")
    print(f"  checkpoints:    {os.path.join(model_dir, train.CHECKPOINT_DIR)}")
    print(f"  spectra:        {analysis['npz']}")
    print(f"  summary table:  {analysis['csv']}")
    if analysis.get("png"):
        print(f"  spectrum plot:  {analysis['png']}")
    print(f"\nOpen TensorBoard with:\n  tensorboard --logdir {os.path.join(model_dir, train.LOG_DIR)}")


if __name__ == "__main__":
    main()
