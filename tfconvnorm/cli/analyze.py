r"""Singular values of every convolution (and Dense) layer of a trained network.

The analysis of Sedghi, Gupta & Long (ICLR 2019, Figure 1: the sorted
singular values of each conv layer of a pretrained ResNet V2), for the
checkpoints people have:

  # a Keras model file (geometry from the model itself)
  tfconvnorm-analyze --checkpoint=model.keras --output_dir=out
  # a train.py model_dir (TF2 checkpoint; its config.json says what to rebuild)
  tfconvnorm-analyze --checkpoint=runs/resnet32 --output_dir=out
  # a TF1 checkpoint with its .meta graph (the Model Garden's ImageNet ResNet V2)
  tfconvnorm-analyze --checkpoint=model.ckpt-250200 --skip_1x1 --output_dir=out
  # a TF-slim checkpoint (slim's README evaluated at 299)
  tfconvnorm-analyze --checkpoint=resnet_v2_50.ckpt --image_size=299 --output_dir=out
  # a keras.applications weights file
  tfconvnorm-analyze --checkpoint=resnet50v2_weights_tf_dim_ordering_tf_kernels.h5 \
      --output_dir=out
  # a TF2 SavedModel (tf.saved_model.save, model.export(), TF Hub): read, not run
  tfconvnorm-analyze --checkpoint=saved_model_dir --output_dir=out

Writes spectra.npz, summary.csv and spectra.png to --output_dir and prints a
table. Every layer is taken with its own zero padding: its spectrum is that of
the circular convolution on the embedding size N that contains it, an
entrywise certified upper bound on the layer's singular values, and each
layer gets a certified interval [sigma_max_lower, sigma_max_upper] for its
norm (Lanczos on the real layer for the lower end).
"""

import sys

from absl import app
from absl import flags

from tfconvnorm import cli
from tfconvnorm import analysis
from tfconvnorm import checkpoints
from tfconvnorm import spectral
from tfconvnorm.checkpoints import architectures


def define_flags(flag_values=flags.FLAGS):
    """Defines the command's flags on `flag_values` (nothing is defined at import)."""
    fv = flag_values
    flags.DEFINE_string("checkpoint", None,
                        "A .keras file, a train.py model_dir or TF2 checkpoint, a TF1 checkpoint "
                        "prefix with its .meta graph, a TF-slim resnet_v2 checkpoint, a Keras "
                        ".h5 / .weights.h5 weights file, or a SavedModel directory.", flag_values=fv)
    flags.DEFINE_enum("format", "auto", ("auto",) + checkpoints.FORMATS,
                      "Checkpoint format; detected from the file by default.", flag_values=fv)
    flags.DEFINE_enum("architecture", None, architectures.ARCHITECTURES,
                      "Architecture to rebuild for formats without one (tf2, slim, keras_weights). "
                      "Default: from config.json (tf2), the variable names (slim) or the layer "
                      "names (keras_weights).", flag_values=fv)
    flags.DEFINE_integer("depth", None, "Depth of cifar_resnet_v2 (e.g. 32); default from "
                         "config.json.", flag_values=fv)
    flags.DEFINE_integer("image_size", None,
                         "Input height and width of the rebuilt network (default 224 for ImageNet "
                         "ResNets, config.json's or 32 for cifar_resnet_v2); for TF1 graphs, used "
                         "only where the graph leaves the input size open.", flag_values=fv)
    flags.DEFINE_string("layers", None, "Regex: analyse only the layers whose name it matches "
                        "(re.search).", flag_values=fv)
    flags.DEFINE_enum("boundary", "layer", ("layer", "circular"),
                      "'layer': every layer with its own zero padding (certified upper bounds "
                      "on the real layer's singular values); 'circular': each conv's circular "
                      "operator at its input size, strides included, as the paper plotted "
                      "(input sizes a stride does not divide are rounded up, marked "
                      "approximate).", flag_values=fv)
    flags.DEFINE_bool("skip_1x1", False, "Leave 1x1 convs out of spectra.png, as the published "
                      "plot did (spectra.npz and summary.csv keep them).", flag_values=fv)
    flags.DEFINE_bool("log_scale", True, "Logarithmic singular-value axis in spectra.png.", flag_values=fv)
    flags.DEFINE_bool("log_rank", False, "Logarithmic rank axis in spectra.png.", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Directory for spectra.npz, summary.csv, spectra.png.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", checkpoints.DTYPES, "Precision of the computation.", flag_values=fv)
    flags.DEFINE_integer("bound_iterations", spectral.DEFAULT_POWER_ITERATIONS,
                         "Lanczos iterations on each real layer for the certified lower bound on "
                         "its norm (0: skip the lower bounds' iterations, a random vector).", flag_values=fv)


def main(argv, flag_values=flags.FLAGS):
    fv = flag_values
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not fv.checkpoint:
        raise app.UsageError("--checkpoint is required")
    if not fv.output_dir:
        raise app.UsageError("--output_dir is required")
    try:
        analysis.analyse(fv.checkpoint, fv.output_dir,
                         format=None if fv.format == "auto" else fv.format,
                         architecture=fv.architecture, depth=fv.depth,
                         image_size=fv.image_size, layers=fv.layers, skip_1x1=fv.skip_1x1,
                         dtype=fv.dtype, log_scale=fv.log_scale, log_rank=fv.log_rank,
                         bound_iterations=fv.bound_iterations, boundary=fv.boundary)
    except (checkpoints.CheckpointError, FileNotFoundError) as error:
        # The message names the file and the first mismatching variable; a TF
        # traceback would only bury it.
        sys.exit(f"{_program()}: error: {error}")
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def _program():
    return sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "tfconvnorm-analyze"


def run():
    """The `tfconvnorm-analyze` console script (and `python analyze.py`)."""
    cli.define_key_flags(define_flags, __doc__)
    app.run(main)
