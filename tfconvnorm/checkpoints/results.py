"""Spectra of `LayerRecord`s and their files: `spectra.npz`, `summary.csv`, a table."""

import csv
import dataclasses
import io
import math
import os

import keras
import numpy as np
import tensorflow as tf

from tfconvnorm.files import atomic_write
from tfconvnorm import geometry as geometry_lib
from tfconvnorm import spectral

#: Precisions `layer_spectra` computes in.
DTYPES = ("float32", "float64")


SPECTRA_FILENAME = "spectra.npz"
SUMMARY_FILENAME = "summary.csv"
LIPSCHITZ_ROW_NAME = "LIPSCHITZ_UPPER_BOUND"
LIPSCHITZ_NOTE = "certified l2 Lipschitz upper bound of the whole model in inference"
APPROXIMATE_NOTE = ("approximate: the stride does not divide the input size; computed "
                    "at the next size it divides")
BOUND_NOTE = ("spectrum: upper bounds on the layer's singular values, entry by entry "
              "(circular convolution on the embedding size)")
CIRCULAR_NOTE = "spectrum: the circular operator's (not a bound on a zero-padded layer)"


@dataclasses.dataclass(frozen=True, eq=False)
class LayerSpectrum:
    """One layer's spectrum (sorted descending), its geometry, and a certified
    interval for its norm.

    `singular_values` are those `tfconvnorm.conv_singular_values` gives for
    the geometry: with the layer's zero padding, entrywise upper bounds on
    the layer's singular values. `sigma_max_lower <= ||layer|| <=
    sigma_max_upper` (float64, `conv_operator_norm_bounds`); NaN when the
    bounds were not computed.
    """

    name: str
    geometry: geometry_lib.ConvGeometry
    singular_values: np.ndarray
    sigma_max_lower: float = math.nan
    sigma_max_upper: float = math.nan

    @property
    def count(self):
        return int(self.singular_values.shape[0])

    @property
    def sigma_max(self):
        return float(self.singular_values[0]) if self.count else 0.0

    @property
    def sigma_min(self):
        return float(self.singular_values[-1]) if self.count else 0.0

    @property
    def condition_number(self):
        """sigma_max / sigma_min; inf for a singular operator."""
        return self.sigma_max / self.sigma_min if self.sigma_min > 0 else math.inf

    @property
    def is_1x1(self):
        """A convolution whose kernel is 1 on every spatial axis (Dense excluded)."""
        spatial = self.geometry.kernel_shape[:-2]
        return bool(spatial) and all(k == 1 for k in spatial)


#: Layers whose spectra `layer_spectra` computes in one pooled call: a bound
#: on memory (every per-frequency matrix of a chunk exists at once).
_SPECTRA_CHUNK = 8


def layer_spectra(records, dtype="float32", progress=False, bounds=True,
                  bound_iterations=spectral.DEFAULT_POWER_ITERATIONS):
    """Every singular value of each record's operator, through the spectral core.

    Args:
      records: `LayerRecord`s.
      dtype: "float32" or "float64": the kernels are cast to it.
      progress: show a Keras progress bar over the layers.
      bounds: also compute each layer's certified norm interval (Lanczos on
        the real layer for the lower end).
      bound_iterations: Lanczos iterations for the lower bounds.

    Returns:
      A list of `LayerSpectrum`, in the order of `records`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    bar = None
    if progress and records:
        bar = keras.utils.Progbar(len(records), unit_name="layer")
    result = []
    for start in range(0, len(records), _SPECTRA_CHUNK):
        chunk = records[start:start + _SPECTRA_CHUNK]
        kernels = [tf.cast(tf.convert_to_tensor(r.kernel), dtype) for r in chunk]
        geometries = [r.geometry for r in chunk]
        values = spectral.conv_singular_values_many(kernels, geometries)
        intervals = (spectral.conv_operator_norm_bounds_many(kernels, geometries,
                                                             iterations=bound_iterations)
                     if bounds else [(math.nan, math.nan)] * len(chunk))
        for record, spectrum, (lower, upper) in zip(chunk, values, intervals):
            result.append(LayerSpectrum(record.name, record.geometry, spectrum.numpy(),
                                        float(lower), float(upper)))
        if bar is not None:
            bar.update(len(result))
    return result


def _dims(values):
    return "x".join(str(int(v)) for v in values)


def padding_text(padding):
    """A geometry's padding as text: the mode's name, or explicit pads as
    "(b, a)x(b, a)" per axis (`parse_padding_text` reads it back)."""
    if isinstance(padding, str):
        return padding
    return "x".join(f"({b}, {a})" for b, a in padding)


def parse_padding_text(text):
    """Inverse of `padding_text`."""
    if not text.startswith("("):
        return text
    return tuple(tuple(int(v) for v in pair.strip("()").split(","))
                 for pair in text.split("x"))


def write_spectra_npz(path, spectra, metadata=None):
    """Writes the spectra to an `.npz` loadable with `np.load(path)` (no pickle).

    Keys: `names` (str), `sv/<i>` (all singular values of layer i, sorted
    descending: for a zero-padded layer, entrywise upper bounds on its own),
    per-layer `kernel_shape/<i>`, `input_shape/<i>`, `strides/<i>`,
    `dilation_rate/<i>`, `embedding_shape/<i>` (the circular size N whose
    spectrum `sv/<i>` is) (int64), and the vectors `groups`, `kinds`,
    `padding` (`padding_text`), `layer_padding`, `approximate`, `sigma_max`,
    `sigma_min`, `count`, `sigma_max_lower`, `sigma_max_upper` (the certified
    interval of the layer's norm); `meta/<key>` holds `metadata` values as
    strings. Written atomically.
    """
    arrays = {
        "names": np.array([s.name for s in spectra], dtype=str),
        "kinds": np.array([s.geometry.kind for s in spectra], dtype=str),
        "padding": np.array([padding_text(s.geometry.padding) for s in spectra], dtype=str),
        "layer_padding": np.array([s.geometry.layer_padding or "" for s in spectra], dtype=str),
        "groups": np.array([s.geometry.groups for s in spectra], dtype=np.int64),
        "approximate": np.array([s.geometry.approximate for s in spectra], dtype=bool),
        "sigma_max": np.array([s.sigma_max for s in spectra], dtype=np.float64),
        "sigma_min": np.array([s.sigma_min for s in spectra], dtype=np.float64),
        "count": np.array([s.count for s in spectra], dtype=np.int64),
        "sigma_max_lower": np.array([s.sigma_max_lower for s in spectra], dtype=np.float64),
        "sigma_max_upper": np.array([s.sigma_max_upper for s in spectra], dtype=np.float64),
    }
    for index, s in enumerate(spectra):
        arrays[f"sv/{index}"] = np.asarray(s.singular_values)
        for field in ("kernel_shape", "input_shape", "strides", "dilation_rate",
                      "embedding_shape"):
            arrays[f"{field}/{index}"] = np.array(getattr(s.geometry, field), dtype=np.int64)
    for key, value in (metadata or {}).items():
        arrays[f"meta/{key}"] = np.array(str(value))
    atomic_write(os.fspath(path), lambda f: np.savez(f, **arrays))


def read_spectra_npz(path):
    """Reads `write_spectra_npz` output back: `(list of LayerSpectrum, metadata dict)`."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        names = [str(n) for n in data["names"]]
        spectra = []
        for index, name in enumerate(names):
            geometry = geometry_lib.ConvGeometry(
                kernel_shape=tuple(int(v) for v in data[f"kernel_shape/{index}"]),
                input_shape=tuple(int(v) for v in data[f"input_shape/{index}"]),
                strides=tuple(int(v) for v in data[f"strides/{index}"]),
                dilation_rate=tuple(int(v) for v in data[f"dilation_rate/{index}"]),
                groups=int(data["groups"][index]), kind=str(data["kinds"][index]),
                padding=parse_padding_text(str(data["padding"][index])),
                approximate=bool(data["approximate"][index]),
                layer_padding=str(data["layer_padding"][index]) or None)
            spectra.append(LayerSpectrum(name, geometry, data[f"sv/{index}"],
                                         float(data["sigma_max_lower"][index]),
                                         float(data["sigma_max_upper"][index])))
        metadata = {key[len("meta/"):]: str(data[key]) for key in data.files
                    if key.startswith("meta/")}
    return spectra, metadata


SUMMARY_COLUMNS = ("index", "name", "kind", "kernel_shape", "input_size", "strides",
                   "dilation_rate", "groups", "padding", "embedding_size", "approximate",
                   "sigma_max_lower", "sigma_max_upper", "sigma_max", "sigma_min",
                   "condition_number", "count", "note")


def _note(geometry):
    if geometry.approximate:
        return APPROXIMATE_NOTE
    if geometry.padding == spectral.CIRCULAR and geometry.layer_padding not in (None, "circular"):
        return CIRCULAR_NOTE
    if geometry.kind != geometry_lib.KIND_DENSE and geometry.padding != spectral.CIRCULAR:
        return BOUND_NOTE
    return ""


def _lipschitz_note(lipschitz, unavailable):
    if lipschitz is None:
        return f"not computed: {unavailable or 'no model'}"
    top = ", ".join(f"{f.name} {f.factor:.4g}" for f in lipschitz.top_contributors(5))
    return f"{LIPSCHITZ_NOTE}; largest factors: {top}"


def summary_rows(spectra, lipschitz=None, unavailable=None):
    """One dict per layer (columns `SUMMARY_COLUMNS`), then the model's row.

    `sigma_max_lower` / `sigma_max_upper` bound the layer's norm; `sigma_max`,
    `sigma_min` and `condition_number` are those of the spectrum written to
    spectra.npz (the note says whether it bounds the layer's). The last row
    holds `lipschitz` (a `tfconvnorm.LipschitzBound`) under `sigma_max_upper`,
    or says why there is none (`unavailable`)."""
    rows = []
    for index, s in enumerate(spectra):
        g = s.geometry
        rows.append({
            "index": index, "name": s.name, "kind": g.kind,
            "kernel_shape": _dims(g.kernel_shape), "input_size": _dims(g.input_shape),
            "strides": _dims(g.strides), "dilation_rate": _dims(g.dilation_rate),
            "groups": g.groups, "padding": padding_text(g.padding),
            "embedding_size": _dims(g.embedding_shape), "approximate": g.approximate,
            "sigma_max_lower": repr(s.sigma_max_lower), "sigma_max_upper": repr(s.sigma_max_upper),
            "sigma_max": repr(s.sigma_max), "sigma_min": repr(s.sigma_min),
            "condition_number": repr(s.condition_number), "count": s.count,
            "note": _note(g),
        })
    rows.append({column: "" for column in SUMMARY_COLUMNS} | {
        "name": LIPSCHITZ_ROW_NAME,
        "sigma_max_upper": "" if lipschitz is None else repr(float(lipschitz)),
        "note": _lipschitz_note(lipschitz, unavailable)})
    return rows


def write_summary_csv(path, spectra, lipschitz=None, unavailable=None):
    """Writes `summary_rows(spectra, lipschitz, unavailable)` as CSV, atomically."""
    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(summary_rows(spectra, lipschitz, unavailable))
        f.write(text.getvalue().encode("utf8"))
    atomic_write(os.fspath(path), write)


def format_summary_table(spectra, max_name=40, lipschitz=None, unavailable=None):
    """A plain-text table of the summary, for the terminal, ending on the
    model's certified Lipschitz bound (or why there is none)."""
    header = (f"{'#':>3}  {'layer':<{max_name}}  {'kernel':>14}  {'input':>9}  {'stride':>6}  "
              f"{'padding':>8}  {'N':>9}  {'lower':>9}  {'upper':>9}  {'sigma_min':>9}  "
              f"{'count':>8}")
    lines = [header, "-" * len(header)]
    for index, s in enumerate(spectra):
        g = s.geometry
        name = s.name if len(s.name) <= max_name else "..." + s.name[-(max_name - 3):]
        mark = "*" if g.approximate else ""
        padding = "explicit" if not isinstance(g.padding, str) else g.padding
        lines.append(
            f"{index:>3}  {name:<{max_name}}  {_dims(g.kernel_shape):>14}  "
            f"{_dims(g.input_shape) + mark or '-':>9}  {_dims(g.strides) or '-':>6}  "
            f"{padding:>8}  {_dims(g.embedding_shape) or '-':>9}  "
            f"{s.sigma_max_lower:>9.4g}  {s.sigma_max_upper:>9.4g}  {s.sigma_min:>9.4g}  "
            f"{s.count:>8}")
    lines.append("-" * len(header))
    lines.append("lower <= ||layer|| <= upper (certified); sigma_min is the spectrum's: "
                 "for zero-padded layers an upper bound on the layer's, for circular ones "
                 "the circular operator's. N: the circular size whose spectrum bounds the "
                 "layer.")
    if lipschitz is not None:
        lines.append(lipschitz.summary())
    else:
        lines.append(f"no Lipschitz bound of the model: {unavailable or 'no model'}")
    if any(s.geometry.approximate for s in spectra):
        lines.append(f"* {APPROXIMATE_NOTE}")
    return "\n".join(lines)
