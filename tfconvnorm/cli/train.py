r"""Trains a CIFAR ResNet V2, optionally projecting every conv onto an operator-norm ball.

    tfconvnorm-train --dataset=cifar10 --depth=32 --model_dir=/tmp/resnet32_base
    tfconvnorm-train --dataset=cifar10 --depth=32 --clip_to=1.0 --model_dir=/tmp/resnet32_clip

This module only defines the flags and turns them into a
`tfconvnorm.training.TrainConfig`; `tfconvnorm.training.train_and_evaluate`
does the work (see it for the protocol and the run directory's layout).
Killed and restarted with the same --model_dir, a run resumes from the last
completed epoch.
"""

import dataclasses
import os

from absl import app
from absl import flags

from tfconvnorm import cli
from tfconvnorm import spectral as tfcn_spectral
from tfconvnorm.models import cifar_input
from tfconvnorm.training import (CHECKPOINT_DIR, LOG_DIR, PROGRESS, RESULTS_FILE, STRATEGIES,
                                 TrainConfig, check_model_dir, train_and_evaluate,
                                 validate_config)

def define_flags(flag_values=flags.FLAGS):
    """Defines the binary's flags on `flag_values`.

    Called only when run as a binary (or by tests on their own FlagValues), so
    importing this module beside analyze.py defines no clashing flags.
    """
    d = TrainConfig()
    fv = flag_values
    flags.DEFINE_string("dataset", d.dataset, f"One of {sorted(cifar_input.DATASETS)}.",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data directory (default ~/tensorflow_datasets).",
                        flag_values=fv)
    flags.DEFINE_string("manual_dir", None, "Folder holding the raw download (e.g. "
                        "cifar-10-binary.tar.gz), to prepare the dataset offline.", flag_values=fv)
    flags.DEFINE_boolean("download", d.download, "Let TFDS download a dataset that is not "
                         "prepared.", flag_values=fv)
    flags.DEFINE_integer("depth", d.depth, "ResNet V2 depth: 6n+2 (basic blocks) or 9n+2 "
                         "(bottleneck blocks).", flag_values=fv)
    flags.DEFINE_integer("epochs", d.epochs, "Training epochs.", flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", None, "Initial learning rate (default 0.1 * batch_size "
                       "/ 128).", flag_values=fv)
    flags.DEFINE_list("lr_boundaries", None, "Epochs at which the learning rate is multiplied by "
                      "--lr_decay (default 91,136,182 for 182 epochs, scaled in proportion to "
                      "--epochs).", flag_values=fv)
    flags.DEFINE_float("lr_decay", d.lr_decay, "Learning-rate factor at each boundary.",
                       flag_values=fv)
    flags.DEFINE_float("weight_decay", d.weight_decay, "L2 weight decay in the tf.nn.l2_loss "
                       "sense: loss += weight_decay * sum(w^2) / 2.", flag_values=fv)
    flags.DEFINE_float("momentum", d.momentum, "SGD momentum.", flag_values=fv)
    flags.DEFINE_float("clip_to", None, "Operator-norm bound for every conv; unset trains the "
                       "baseline.", flag_values=fv)
    flags.DEFINE_integer("clip_every", d.clip_every, "Steps between projections.",
                         flag_values=fv)
    flags.DEFINE_string("clip_method", d.clip_method, f"Projection method, one of "
                        f"{tfcn_spectral.METHODS}.", flag_values=fv)
    flags.DEFINE_string("clip_boundary", d.clip_boundary, "Operator the periodic projections "
                        "act on: 'layer' (each conv's own zero padding, so the bound holds for "
                        "the real layer) or 'circular' (the published experiment's operator). "
                        "The final projection always uses 'layer'.", flag_values=fv)
    flags.DEFINE_string("final_clip_method", d.final_clip_method, "Method of the projection "
                        "that ends training: 'alternating' guarantees the bound, 'paper' is the "
                        "published protocol throughout.", flag_values=fv)
    flags.DEFINE_integer("spectra_every_n_epochs", d.spectra_every_n_epochs, "Log every "
                         "layer's spectrum to TensorBoard every N epochs (0: never).",
                         flag_values=fv)
    flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, model and results go.",
                        flag_values=fv)
    flags.DEFINE_string("strategy", d.strategy, f"tf.distribute strategy, one of {STRATEGIES}.",
                        flag_values=fv)
    flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.", flag_values=fv)
    flags.DEFINE_boolean("mixed_precision", d.mixed_precision, "Compute in float16 (bfloat16 "
                         "on TPU), keep the weights in float32.", flag_values=fv)
    flags.DEFINE_integer("seed", d.seed, "Random seed.", flag_values=fv)
    flags.DEFINE_boolean("deterministic", d.deterministic, "Bit-identical reruns with the same "
                         "--seed (TF op determinism; slower).", flag_values=fv)
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps in total (smoke runs).",
                         flag_values=fv)
    flags.DEFINE_integer("checkpoints_to_keep", d.checkpoints_to_keep, "Per-epoch checkpoints "
                         "kept (0: all).", flag_values=fv)
    flags.DEFINE_integer("validation_freq", d.validation_freq, "Evaluate on the test split "
                         "every N epochs.", flag_values=fv)
    flags.DEFINE_integer("bn_recalibration_batches", d.bn_recalibration_batches, "Training "
                         "batches over which BatchNormalization statistics are re-estimated at "
                         "the end, after the final projection (0: keep the running averages).",
                         flag_values=fv)
    flags.DEFINE_integer("train_examples", None, "Train on a reduced training set: the "
                         "split's first N examples, the same in every run (default: all).",
                         flag_values=fv)
    flags.DEFINE_integer("clip_bn_batches", d.clip_bn_batches, "With --clip_to: training "
                         "batches over which BatchNormalization statistics are re-estimated "
                         "after every projection, so that per-epoch validation sees statistics "
                         "of the projected weights (0: the running averages catch up alone).",
                         flag_values=fv)
    flags.DEFINE_integer("validation_bn_batches", d.validation_bn_batches, "Training batches "
                         "over which BatchNormalization statistics are re-estimated before "
                         "every per-epoch validation (0: Keras' running averages).",
                         flag_values=fv)
    flags.DEFINE_string("progress", d.progress, f"Keras progress output, one of "
                        f"{tuple(PROGRESS)}.", flag_values=fv)
    flags.DEFINE_float("lipschitz", None, "The Lipschitz mode: train a residual network "
                       "(--depth 6n+2) whose certified l2 Lipschitz constant is at most this, "
                       "by construction (every layer constrained, no BatchNormalization); "
                       "unset trains the ResNet V2.", flag_values=fv)
    flags.DEFINE_string("lipschitz_activation", d.lipschitz_activation, "Activation of the "
                        "Lipschitz mode: 'maxmin' (GroupSort of pairs) or 'relu'.",
                        flag_values=fv)
    flags.DEFINE_list("certified_eps", None, "l2 radii at which certified accuracy on the "
                      "test split is logged every epoch and recorded (default 0.1,0.25,0.5 "
                      "with --lipschitz, none otherwise).", flag_values=fv)


def _floats(flag_values, name, what):
    """A list flag's values as a tuple of floats (None when unset)."""
    values = flag_values[name].value
    if values is None:
        return None
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated {what}, got "
                         f"{','.join(values)!r}") from None


def config_from_flags(flag_values=flags.FLAGS):
    """(TrainConfig, model_dir) from parsed flags, checked: app.UsageError when bad."""
    try:
        model_dir = flag_values.model_dir
        if not model_dir:
            raise ValueError("--model_dir is required")
        boundaries = _floats(flag_values, "lr_boundaries", "epochs")
        eps = _floats(flag_values, "certified_eps", "radii")
        names = {f.name for f in dataclasses.fields(TrainConfig)} - {
            "lr_boundaries", "num_classes", "input_shape", "shuffle_buffer", "certified_eps"}
        config = TrainConfig(lr_boundaries=boundaries, certified_eps=eps,
                             **{name: flag_values[name].value for name in names})
        validate_config(config)
        check_model_dir(config, model_dir)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return config, model_dir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config, model_dir = config_from_flags(flags.FLAGS)
    results = train_and_evaluate(config, model_dir)
    bound = f" (bound {config.clip_to:g})" if config.clip_to else ""
    if config.lipschitz is not None:
        certified = ", ".join(f"{v:.4f} at eps {k}" for k, v in
                              results["certified_accuracy"].items())
        print(f"certified Lipschitz bound {results['lipschitz_upper_bound']:.5g} (promised "
              f"{config.lipschitz:g}); certified accuracy {certified}")
    print(f"test accuracy {results['test_accuracy']:.4f} (error {results['test_error']:.4f}); "
          f"largest conv operator norm {results['max_conv_operator_norm']:.5g}{bound}; "
          f"{results['wall_time_s']:.0f} s")
    print(f"results:     {os.path.join(model_dir, RESULTS_FILE)}")
    print(f"model:       {results['model_path']}")
    print(f"checkpoints: {os.path.join(model_dir, CHECKPOINT_DIR)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(model_dir, LOG_DIR)}")


def run():
    """The `tfconvnorm-train` console script (and `python train.py`)."""
    cli.define_key_flags(define_flags, __doc__)
    app.run(main)
