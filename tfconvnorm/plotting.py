"""Figures of layer spectra: sorted singular values against rank, one curve per layer.

matplotlib is imported inside the functions, so `import tfconvnorm` never needs
it. New figures are plain `matplotlib.figure.Figure`s, not pyplot ones: no GUI
backend is touched and nothing accumulates in pyplot's figure registry.
"""

import io

import numpy as np

DEFAULT_CMAP = "viridis"
# A sorted curve is monotone, so a few thousand evenly spaced ranks draw it
# faithfully; ResNet layers have up to ~10^6 singular values each.
DEFAULT_MAX_POINTS = 4096
# Up to this many layers get a legend; more get a colour bar of depth.
MAX_LEGEND_ENTRIES = 12
DEFAULT_DPI = 120
# On a log axis, values below this fraction of the largest one (exact zeros,
# computed as ~1e-15, of strided 1x1 convs, say) are drawn at the floor, dotted,
# so that they do not stretch the axis over the informative range (the
# paper's figure spans about three decades).
DEFAULT_LOG_FLOOR = 1e-4


def _subsample(values, max_points):
    """Evenly spaced ranks (first and last kept) of a sorted curve."""
    n = values.shape[0]
    ranks = np.arange(1, n + 1)
    if max_points and n > max_points:
        keep = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
        return ranks[keep], values[keep]
    return ranks, values


def plot_spectra(spectra, ax=None, log_x=False, log_y=True, title=None, cmap=DEFAULT_CMAP,
                 approximate=(), max_points=DEFAULT_MAX_POINTS, log_floor=DEFAULT_LOG_FLOOR):
    """Plots each layer's sorted singular values against their rank.

    The kind of plot Sedghi et al. (2019) published for ResNet V2: one curve
    per layer, coloured by the layer's position in `spectra` (its depth).

    Args:
      spectra: ordered mapping layer name -> 1-D array of singular values
        (sorted descending; sorted here otherwise).
      ax: a matplotlib Axes to draw on; a new Figure when None.
      log_x, log_y: logarithmic rank / singular-value axes.
      log_floor: on a log value axis, the axis starts at `log_floor` times the
        largest value; each curve's values below it (zeros included) are drawn
        at the floor as a dotted line of the curve's colour, and a note says
        so. 0: no floor (non-positive values are then left out).
      title: axes title.
      cmap: matplotlib colormap name for the depth colouring.
      approximate: names whose spectrum was computed at a rounded-up input
        size (stride not dividing it); drawn dashed.
      max_points: draw at most this many points per curve (0: all).

    Returns:
      The matplotlib Figure.

    Raises:
      ValueError: empty `spectra` or a spectrum that is not 1-D.
    """
    import matplotlib  # pylint: disable=g-import-not-at-top
    if ax is None:
        from matplotlib import figure as figure_lib  # pylint: disable=g-import-not-at-top
        fig = figure_lib.Figure(figsize=(8, 5))
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    if not spectra:
        raise ValueError(f"spectra must hold at least one layer, got {spectra!r}")
    colormap = matplotlib.colormaps[cmap]
    names = list(spectra)
    approximate = set(approximate)
    depth_scale = max(len(names) - 1, 1)
    curves = {}
    for name in names:
        values = np.asarray(spectra[name], dtype=np.float64)
        if values.ndim != 1:
            raise ValueError(f"spectra[{name!r}] must be 1-D, got shape {values.shape}")
        curves[name] = _subsample(-np.sort(-values), max_points)
    floor = None
    if log_y and log_floor:
        top = max((float(v[0]) for _, v in curves.values() if v.size), default=0.0)
        floor = top * log_floor if top > 0 else None
    below_floor = False
    for depth, name in enumerate(names):
        ranks, values = curves[name]
        color = colormap(depth / depth_scale)
        low = (values < floor if floor is not None else values <= 0 if log_y
               else np.zeros(values.shape, bool))
        ax.plot(ranks[~low], values[~low], color=color, linewidth=1.0,
                linestyle="--" if name in approximate else "-",
                label=name + (" (approx.)" if name in approximate else ""))
        if floor is not None and np.any(low):
            below_floor = True
            # From the last point above the floor down to it, then along it
            # (labels starting with "_" stay out of the legend).
            start = max(int(np.argmax(low)) - 1, 0)
            ax.plot(ranks[start:], np.maximum(values[start:], floor), color=color,
                    linewidth=1.0, linestyle=":", label="_below_floor")
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    if floor is not None:
        ax.set_ylim(bottom=floor / 1.5)
        if below_floor:
            ax.text(0.01, 0.01, f"dotted: values below {floor:.2g} ({log_floor:g} x the largest), "
                    "zeros included, drawn at that floor", transform=ax.transAxes,
                    ha="left", va="bottom", fontsize="small")
    ax.set_xlabel("rank")
    ax.set_ylabel("singular value")
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if len(names) <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize="small")
    else:
        mappable = matplotlib.cm.ScalarMappable(
            norm=matplotlib.colors.Normalize(0, len(names) - 1), cmap=colormap)
        fig.colorbar(mappable, ax=ax, label="layer depth (0 = first layer)")
        if approximate:
            ax.text(0.99, 0.99, "dashed: input size rounded up (approximate)",
                    transform=ax.transAxes, ha="right", va="top", fontsize="small")
    return fig


def figure_to_png(fig, dpi=DEFAULT_DPI):
    """Renders a matplotlib Figure to PNG bytes (for files or TensorBoard images)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def spectra_figure_png(names, spectra, title, dpi=80):
    """PNG bytes of all sorted spectra on log-log axes (the spectrum logger's image;
    small, TensorBoard shows it small anyway); None without matplotlib."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return None
    figure = plot_spectra(dict(zip(names, spectra)), log_x=True, log_y=True, title=title)
    return figure_to_png(figure, dpi=dpi)
