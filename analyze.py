r"""Singular values of every convolution (and Dense) layer of a trained network.

The analysis of Sedghi, Gupta & Long (ICLR 2019, Figure 1: the sorted
singular values of each conv layer of a pretrained ResNet V2), for the
checkpoints people have:

  # a Keras model file (geometry from the model itself)
  python analyze.py --checkpoint=model.keras --output_dir=out
  # a train.py model_dir (TF2 checkpoint; its config.json says what to rebuild)
  python analyze.py --checkpoint=runs/resnet32 --output_dir=out
  # a TF1 checkpoint with its .meta graph (the Model Garden's ImageNet ResNet V2)
  python analyze.py --checkpoint=model.ckpt-250200 --skip_1x1 --output_dir=out
  # a TF-slim checkpoint (slim's README evaluated at 299)
  python analyze.py --checkpoint=resnet_v2_50.ckpt --image_size=299 --output_dir=out
  # a keras.applications weights file
  python analyze.py --checkpoint=resnet50v2_weights_tf_dim_ordering_tf_kernels.h5 \
      --output_dir=out

Writes spectra.npz, summary.csv and spectra.png to --output_dir and prints a
table. Every layer is taken with its own zero padding: its spectrum is that of
the circular convolution on the embedding size N that contains it, an
entrywise certified upper bound on the layer's singular values, and each
layer gets a certified interval [sigma_max_lower, sigma_max_upper] for its
norm (Lanczos on the real layer for the lower end).
"""

import json
import os
import re
import sys
import time

from absl import app
from absl import flags

from models import imagenet_resnet_v2
from models import resnet_v2
import tfconvnorm
from tfconvnorm import checkpoints
from tfconvnorm import geometry
from tfconvnorm import plotting
from tfconvnorm import spectral

CIFAR_ARCHITECTURE = "cifar_resnet_v2"
IMAGENET_ARCHITECTURES = ("resnet50v2", "resnet101v2", "resnet152v2",
                          "resnet_v2_50", "resnet_v2_101", "resnet_v2_152")
ARCHITECTURES = (CIFAR_ARCHITECTURE,) + IMAGENET_ARCHITECTURES
DEFAULT_IMAGENET_SIZE = 224
DEFAULT_CIFAR_SIZE = 32
DEFAULT_CIFAR_CLASSES = 10
CONFIG_FILENAME = "config.json"
PLOT_FILENAME = "spectra.png"

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None,
                    "A .keras file, a train.py model_dir or TF2 checkpoint, a TF1 checkpoint "
                    "prefix with its .meta graph, a TF-slim resnet_v2 checkpoint, or a Keras "
                    ".h5 / .weights.h5 weights file.")
flags.DEFINE_enum("format", "auto", ("auto",) + checkpoints.FORMATS,
                  "Checkpoint format; detected from the file by default.")
flags.DEFINE_enum("architecture", None, ARCHITECTURES,
                  "Architecture to rebuild for formats without one (tf2, slim, keras_weights). "
                  "Default: from config.json (tf2), the variable names (slim) or the layer "
                  "names (keras_weights).")
flags.DEFINE_integer("depth", None, "Depth of cifar_resnet_v2 (e.g. 32); default from "
                     "config.json.")
flags.DEFINE_integer("image_size", None,
                     "Input height and width of the rebuilt network (default 224 for ImageNet "
                     "ResNets, config.json's or 32 for cifar_resnet_v2); for TF1 graphs, used "
                     "only where the graph leaves the input size open.")
flags.DEFINE_string("layers", None, "Regex: analyse only the layers whose name it matches "
                    "(re.search).")
flags.DEFINE_bool("skip_1x1", False, "Leave 1x1 convs out of spectra.png, as the published "
                  "plot did (spectra.npz and summary.csv keep them).")
flags.DEFINE_bool("log_scale", True, "Logarithmic singular-value axis in spectra.png.")
flags.DEFINE_bool("log_rank", False, "Logarithmic rank axis in spectra.png.")
flags.DEFINE_string("output_dir", None, "Directory for spectra.npz, summary.csv, spectra.png.")
flags.DEFINE_enum("dtype", "float32", checkpoints.DTYPES, "Precision of the computation.")
flags.DEFINE_integer("bound_iterations", spectral.DEFAULT_POWER_ITERATIONS,
                     "Lanczos iterations on each real layer for the certified lower bound on "
                     "its norm (0: skip the lower bounds' iterations, a random vector).")


def _architecture_depth(architecture, depth):
    """`(family, depth)`: family "cifar" or "imagenet"."""
    if architecture is None:
        return None, depth
    name = str(architecture).lower()
    if name == CIFAR_ARCHITECTURE:
        return "cifar", depth
    if name in IMAGENET_ARCHITECTURES:
        return "imagenet", imagenet_resnet_v2.parse_depth(name)
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")


def _find_config(checkpoint, prefix=None):
    """train.py's config.json: in the model_dir given, or next to / above the checkpoint."""
    candidates = []
    if os.path.isdir(checkpoint):
        candidates.append(checkpoint)
    for path in filter(None, (prefix, checkpoint)):
        directory = os.path.dirname(os.path.abspath(path))
        candidates += [directory, os.path.dirname(directory)]
    for directory in candidates:
        path = os.path.join(directory, CONFIG_FILENAME)
        if os.path.isfile(path):
            with open(path, encoding="utf8") as f:
                return json.load(f), path
    return {}, None


def _config_value(config, *keys):
    """First of `keys` found in `config` or one level down (train.py may nest)."""
    for key in keys:
        if key in config:
            return config[key]
    for value in config.values():
        if isinstance(value, dict):
            found = _config_value(value, *keys)
            if found is not None:
                return found
    return None


def _build_cifar(depth, image_size, config, config_path):
    depth = depth or _config_value(config, "depth")
    if depth is None:
        raise ValueError(f"--depth is needed for {CIFAR_ARCHITECTURE} (no {CONFIG_FILENAME} "
                         "next to the checkpoint)")
    num_classes = _config_value(config, "num_classes") or DEFAULT_CIFAR_CLASSES
    input_shape = _config_value(config, "input_shape")
    if image_size is not None or input_shape is None:
        size = image_size or DEFAULT_CIFAR_SIZE
        channels = input_shape[-1] if input_shape else 3
        input_shape = (size, size, channels)
    kwargs = {}
    block_type = _config_value(config, "block_type")
    if block_type:
        kwargs["block_type"] = block_type
    model = resnet_v2.cifar_resnet_v2(int(depth), num_classes=int(num_classes),
                                      input_shape=tuple(int(d) for d in input_shape), **kwargs)
    source = f" ({config_path})" if config_path else ""
    return model, f"{CIFAR_ARCHITECTURE} depth {depth}, input {tuple(input_shape)}{source}"


def _build_imagenet(depth, image_size, include_top=True):
    size = image_size or DEFAULT_IMAGENET_SIZE
    model = imagenet_resnet_v2.build_resnet_v2(depth, size, include_top=include_top)
    top = "" if include_top else ", no classifier"
    return model, f"ResNet{depth}V2 at {size}x{size}{top}"


def _with_values(model, values):
    """`model` (built here, not the caller's) holding the checkpoint's values."""
    for variable in model.weights:
        if variable.path in values:
            variable.assign(values[variable.path])
    return model


def _read_records(fmt, checkpoint, family, depth, image_size):
    """`(records, description of the architecture used, model or a reason)` for
    one format; the model holds the checkpoint's values (for the Lipschitz bound)."""
    if fmt == checkpoints.FORMAT_KERAS:
        model = checkpoints.load_keras_model_file(checkpoint)
        return checkpoints.model_records(model), "model from the .keras file", model
    if fmt == checkpoints.FORMAT_TF1_META:
        return (checkpoints.read_tf1_meta_checkpoint(checkpoint, image_size=image_size),
                "graph from the .meta file", "a TF1 graph, not a Keras model")
    if fmt == checkpoints.FORMAT_TF2:
        prefix = checkpoints.resolve_checkpoint_prefix(checkpoint)
        config, config_path = _find_config(checkpoint, prefix)
        if family is None:
            family, depth = _architecture_depth(
                _config_value(config, "architecture") or CIFAR_ARCHITECTURE, depth)
        if family == "imagenet":
            model, description = _build_imagenet(depth, image_size)
        else:
            model, description = _build_cifar(depth, image_size, config, config_path)
        values = checkpoints.tf2_checkpoint_values(prefix, model)
        records = checkpoints.read_tf2_checkpoint(prefix, model)
        return records, description, _with_values(model, values)
    if fmt == checkpoints.FORMAT_SLIM:
        variables = checkpoints.checkpoint_variables(checkpoint)
        scopes = sorted({name.split("/", 1)[0] for name in variables
                         if name.startswith("resnet_v2_")})
        if family is None:
            if len(scopes) != 1:
                raise ValueError(f"--architecture is needed: {checkpoint} holds the slim "
                                 f"scopes {scopes}")
            family, depth = _architecture_depth(scopes[0], None)
        if family != "imagenet":
            raise ValueError(f"slim checkpoints are ImageNet ResNet V2s; "
                             f"--architecture={CIFAR_ARCHITECTURE} does not apply")
        scope = imagenet_resnet_v2.slim_scope(depth)
        model, description = _build_imagenet(
            depth, image_size, include_top=f"{scope}/logits/weights" in variables)
        records = checkpoints.read_slim_resnet_v2(
            checkpoint, model, lambda path: imagenet_resnet_v2.keras_to_slim(path, depth))
        return (records, description + " (slim names)",
                "slim checkpoints hold a 1001-class classifier the rebuilt model lacks")
    if fmt == checkpoints.FORMAT_KERAS_WEIGHTS:
        names = checkpoints.keras_weights_layer_names(checkpoint)
        if family is None:
            depth = imagenet_resnet_v2.depth_from_weight_names(names)
            if depth is None:
                raise ValueError(f"--architecture is needed: {checkpoint} is not recognisably "
                                 "a ResNet50V2/101V2/152V2 weights file")
            family = "imagenet"
        if family == "imagenet":
            model, description = _build_imagenet(
                depth, image_size, include_top=imagenet_resnet_v2.has_classifier(names))
        else:
            config, config_path = _find_config(checkpoint)
            model, description = _build_cifar(depth, image_size, config, config_path)
        values = checkpoints.keras_weights_values(checkpoint, model)
        records = checkpoints.read_keras_weights_file(checkpoint, model)
        return records, description, _with_values(model, values)
    raise ValueError(f"format must be one of {checkpoints.FORMATS} or None, got {fmt!r}")


def analyse(checkpoint, output_dir, format=None, architecture=None, depth=None,  # pylint: disable=redefined-builtin
            image_size=None, layers=None, skip_1x1=False, dtype="float32", log_scale=True,
            verbose=True, log_rank=False, bound_iterations=None):
    """Computes every layer's singular values and writes spectra.npz / summary.csv / spectra.png.

    Args:
      checkpoint: path of a checkpoint in one of `checkpoints.FORMATS`.
      output_dir: created if needed; the three files are written atomically.
      format: one of `checkpoints.FORMATS`; None detects it.
      architecture: one of `ARCHITECTURES` for formats without a model (tf2,
        slim, keras_weights); None reads it from config.json / the names.
      depth: cifar_resnet_v2 depth (default from config.json).
      image_size: input size of the rebuilt network (224 for ImageNet
        ResNets, config.json's or 32 for CIFAR when None); for TF1 graphs
        only where the graph leaves it open.
      layers: regex; only layers whose name it matches (re.search).
      skip_1x1: leave 1x1 convs out of the plot (as the published one did).
      dtype: "float32" or "float64".
      log_scale, log_rank: logarithmic value / rank axis of the plot.
      verbose: print a progress bar and the summary table.
      bound_iterations: Lanczos iterations behind each layer's certified lower
        bound (default `tfconvnorm.DEFAULT_POWER_ITERATIONS`).

    Returns:
      A dict: `spectra` (list of `checkpoints.LayerSpectrum`), `format`,
      `architecture` (what was rebuilt), `npz`, `csv`, `png` (paths; `png` is
      None when no layer is left to plot), `lipschitz_bound` (the certified
      bound of the whole model, None where it is not available) and
      `lipschitz` (the `tfconvnorm.LipschitzBound`), `table`,
      `seconds` (wall time).

    Raises:
      FileNotFoundError: no checkpoint at `checkpoint`.
      checkpoints.CheckpointError: unreadable or mismatching checkpoint.
      ValueError: bad arguments.
    """
    start = time.perf_counter()
    checkpoint = os.fspath(checkpoint)
    if format is not None and format not in checkpoints.FORMATS:
        raise ValueError(f"format must be one of {checkpoints.FORMATS} or None, got {format!r}")
    if dtype not in checkpoints.DTYPES:
        raise ValueError(f"dtype must be one of {checkpoints.DTYPES}, got {dtype!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
        raise ValueError(f"depth must be an int, got {depth!r}")
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as error:
        raise ValueError(f"layers must be a regular expression, got {layers!r}: {error}") from None
    if not output_dir:
        raise ValueError(f"output_dir must name a directory, got {output_dir!r}")
    family, depth = _architecture_depth(architecture, depth)

    fmt = format or checkpoints.detect_format(checkpoint)
    records, description, model = _read_records(fmt, checkpoint, family, depth, image_size)
    if pattern is not None:
        selected = [r for r in records if pattern.search(r.name)]
        if not selected:
            raise ValueError(f"layers={layers!r} matches none of the {len(records)} layers of "
                             f"{checkpoint} (e.g. {[r.name for r in records[:3]]})")
        records = selected
    if verbose:
        print(f"{checkpoint}: {fmt}, {description}: {len(records)} layers")
    if bound_iterations is None:
        bound_iterations = spectral.DEFAULT_POWER_ITERATIONS
    spectra = checkpoints.layer_spectra(records, dtype=dtype, progress=verbose,
                                        bound_iterations=bound_iterations)

    lipschitz, unavailable = _lipschitz(model)

    os.makedirs(output_dir, exist_ok=True)
    metadata = {"checkpoint": os.path.abspath(checkpoint), "format": fmt,
                "architecture": description, "dtype": dtype,
                "image_size": "" if image_size is None else image_size,
                "layers": layers or "", "bound_iterations": bound_iterations,
                "operator": _operator_description(spectra),
                "lipschitz_upper_bound": "" if lipschitz is None else repr(float(lipschitz)),
                "lipschitz_note": unavailable or checkpoints.LIPSCHITZ_NOTE}
    npz_path = os.path.join(output_dir, checkpoints.SPECTRA_FILENAME)
    csv_path = os.path.join(output_dir, checkpoints.SUMMARY_FILENAME)
    checkpoints.write_spectra_npz(npz_path, spectra, metadata)
    checkpoints.write_summary_csv(csv_path, spectra, lipschitz, unavailable)
    png_path = _write_plot(os.path.join(output_dir, PLOT_FILENAME), spectra, checkpoint,
                           skip_1x1, log_scale, log_rank)
    table = checkpoints.format_summary_table(spectra, lipschitz=lipschitz,
                                             unavailable=unavailable)
    seconds = time.perf_counter() - start
    if verbose:
        print(table)
        print(f"Analysed {len(spectra)} layers in {seconds:.1f} s; wrote {npz_path}, "
              f"{csv_path}" + (f", {png_path}" if png_path else ""))
    return {"spectra": spectra, "format": fmt, "architecture": description,
            "npz": npz_path, "csv": csv_path, "png": png_path,
            "lipschitz_bound": None if lipschitz is None else float(lipschitz),
            "lipschitz": lipschitz,
            "table": table, "seconds": seconds}


def _lipschitz(model):
    """(certified Lipschitz bound of the whole model or None, why not)."""
    if isinstance(model, str):
        return None, model
    try:
        return tfconvnorm.lipschitz_bound(model), None
    except ValueError as error:
        return None, str(error)


def _operator_description(spectra):
    """What the spectra are, in words (plot title, npz metadata)."""
    return geometry.spectra_title([s.geometry for s in spectra])


def _write_plot(path, spectra, checkpoint, skip_1x1, log_scale, log_rank):
    shown = [s for s in spectra if not (skip_1x1 and s.is_1x1)]
    if not shown:
        print(f"No layer left to plot (all {len(spectra)} are 1x1 convs); no {path}",
              file=sys.stderr)
        return None
    title = (f"{os.path.basename(os.path.normpath(checkpoint))}: "
             f"{_operator_description(spectra)}")
    if skip_1x1:
        title += " (1x1 convs skipped)"
    figure = plotting.plot_spectra(
        {s.name: s.singular_values for s in shown}, log_x=log_rank, log_y=log_scale,
        title=title, approximate=[s.name for s in shown if s.geometry.approximate])
    png = plotting.figure_to_png(figure)
    checkpoints.atomic_write(path, lambda f: f.write(png))
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required")
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required")
    try:
        analyse(FLAGS.checkpoint, FLAGS.output_dir,
                format=None if FLAGS.format == "auto" else FLAGS.format,
                architecture=FLAGS.architecture, depth=FLAGS.depth,
                image_size=FLAGS.image_size, layers=FLAGS.layers, skip_1x1=FLAGS.skip_1x1,
                dtype=FLAGS.dtype, log_scale=FLAGS.log_scale, log_rank=FLAGS.log_rank,
                bound_iterations=FLAGS.bound_iterations)
    except (checkpoints.CheckpointError, FileNotFoundError) as error:
        # The message names the file and the first mismatching variable; a TF
        # traceback would only bury it.
        sys.exit(f"analyze.py: error: {error}")
    except ValueError as error:
        raise app.UsageError(str(error)) from error


if __name__ == "__main__":
    app.run(main)
