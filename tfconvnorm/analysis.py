"""The published analysis of trained networks: every layer's spectrum, certified
norm interval and the whole model's Lipschitz bound, written to files.

The flow is one way: `checkpoints.read` (detects the format, resolves the
architecture, reads the kernels and their geometry) -> `checkpoints.layer_spectra`
(the spectral core) -> `lipschitz.lipschitz_bound` (where the checkpoint has a
Keras model) -> the writers (`spectra.npz`, `summary.csv`, `spectra.png`).
The command line is `tfconvnorm.cli.analyze` (`tfconvnorm-analyze`).
"""

import os
import re
import sys
import time

from tfconvnorm import checkpoints
from tfconvnorm import files
from tfconvnorm import geometry
from tfconvnorm import lipschitz as lipschitz_lib
from tfconvnorm import plotting
from tfconvnorm import spectral
from tfconvnorm.spectral.arguments import check_positive_int

PLOT_FILENAME = "spectra.png"


def analyse(checkpoint, output_dir, format=None, architecture=None, depth=None,  # pylint: disable=redefined-builtin
            image_size=None, layers=None, skip_1x1=False, dtype="float32", log_scale=True,
            verbose=True, log_rank=False, bound_iterations=None, boundary=geometry.BOUNDARY_LAYER):
    """Computes every layer's singular values and writes spectra.npz / summary.csv / spectra.png.

    Args:
      checkpoint: path of a checkpoint in one of `checkpoints.FORMATS`.
      output_dir: created if needed; the three files are written atomically.
      format: one of `checkpoints.FORMATS`; None detects it.
      architecture: one of `checkpoints.architectures.ARCHITECTURES` for formats without a model (tf2,
        slim, keras_weights); None reads it from config.json / the names.
      depth: cifar_resnet_v2 depth (default from config.json).
      image_size: input size of the rebuilt network (224 for ImageNet
        ResNets, config.json's or 32 for CIFAR when None); for TF1 graphs and
        SavedModels only where the graph leaves it open.
      layers: regex; only layers whose name it matches (re.search).
      skip_1x1: leave 1x1 convs out of the plot (as the published one did).
      dtype: "float32" or "float64".
      log_scale, log_rank: logarithmic value / rank axis of the plot.
      verbose: print a progress bar and the summary table.
      bound_iterations: Lanczos iterations behind each layer's certified lower
        bound (default `tfconvnorm.DEFAULT_POWER_ITERATIONS`).
      boundary: "layer" (default): every layer with its own zero padding, the
        spectra certified upper bounds of the real layer's; "circular": each
        conv's circular operator at its input size, strides included, as the
        paper plotted (`geometry.circular_geometry`; sizes a stride does not
        divide are rounded up and marked approximate). The whole model's
        Lipschitz bound is the real model's either way.

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
    if dtype not in checkpoints.DTYPES:
        raise ValueError(f"dtype must be one of {checkpoints.DTYPES}, got {dtype!r}")
    image_size = check_positive_int(image_size, "image_size", allow_none=True)
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
        raise ValueError(f"depth must be an int, got {depth!r}")
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as error:
        raise ValueError(f"layers must be a regular expression, got {layers!r}: {error}") from None
    if not output_dir:
        raise ValueError(f"output_dir must name a directory, got {output_dir!r}")
    geometry.check_boundary(boundary)
    found = checkpoints.read(checkpoint, format=format, architecture=architecture, depth=depth,
                             image_size=image_size)
    records, fmt, description = found.records, found.format, found.architecture
    if pattern is not None:
        selected = [r for r in records if pattern.search(r.name)]
        if not selected:
            raise ValueError(f"layers={layers!r} matches none of the {len(records)} layers of "
                             f"{checkpoint} (e.g. {[r.name for r in records[:3]]})")
        records = selected
    if boundary == geometry.BOUNDARY_CIRCULAR:
        records = [r._replace(geometry=geometry.circular_geometry(r.geometry)) for r in records]
    if verbose:
        print(f"{checkpoint}: {fmt}, {description}: {len(records)} layers")
    if bound_iterations is None:
        bound_iterations = spectral.DEFAULT_POWER_ITERATIONS
    spectra = checkpoints.layer_spectra(records, dtype=dtype, progress=verbose,
                                        bound_iterations=bound_iterations)

    lipschitz, unavailable = _lipschitz(found)

    os.makedirs(output_dir, exist_ok=True)
    metadata = {"checkpoint": os.path.abspath(checkpoint), "format": fmt,
                "architecture": description, "dtype": dtype,
                "image_size": "" if image_size is None else image_size,
                "layers": layers or "", "bound_iterations": bound_iterations,
                "boundary": boundary,
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


def _lipschitz(found):
    """(certified Lipschitz bound of the whole model or None, why not)."""
    if found.model is None:
        return None, found.no_model
    try:
        return lipschitz_lib.lipschitz_bound(found.model), None
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
    files.atomic_write(path, lambda f: f.write(png))
    return path
