"""Tests of tfconvnorm/plotting.py."""

import subprocess
import sys

import numpy as np
import pytest

from tfconvnorm import plotting


def _spectra(count=3, size=50):
    rng = np.random.default_rng(0)
    return {f"layer{i}": np.sort(rng.uniform(0.1, 2.0, size + i))[::-1] for i in range(count)}


def test_one_curve_per_layer_coloured_by_depth():
    import matplotlib  # pylint: disable=g-import-not-at-top
    spectra = _spectra(3)
    fig = plotting.plot_spectra(spectra, cmap="viridis")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == list(spectra)
    cmap = matplotlib.colormaps["viridis"]
    np.testing.assert_allclose(lines[0].get_color(), cmap(0.0))
    np.testing.assert_allclose(lines[-1].get_color(), cmap(1.0))
    # Rank on x (1-based), the sorted values on y.
    np.testing.assert_array_equal(lines[1].get_xdata(), np.arange(1, 52))
    np.testing.assert_array_equal(lines[1].get_ydata(), spectra["layer1"])
    assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_xscale() == "linear"


def test_unsorted_input_is_sorted_and_zeros_dropped_on_log_axis():
    fig = plotting.plot_spectra({"a": np.array([0.5, 0.0, 2.0, 1.0])})
    line = fig.axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_ydata(), [2.0, 1.0, 0.5])
    fig = plotting.plot_spectra({"a": np.array([0.5, 0.0, 2.0])}, log_y=False, log_x=True)
    assert fig.axes[0].get_xscale() == "log"
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_ydata(), [2.0, 0.5, 0.0])


def test_long_curves_are_subsampled_keeping_ends():
    values = np.linspace(10.0, 1.0, 100_000)
    fig = plotting.plot_spectra({"big": values}, max_points=1000)
    line = fig.axes[0].get_lines()[0]
    x, y = line.get_xdata(), line.get_ydata()
    assert len(x) <= 1000
    assert (x[0], x[-1]) == (1, 100_000) and (y[0], y[-1]) == (10.0, 1.0)


def test_approximate_layers_are_dashed_and_many_layers_get_a_colorbar():
    spectra = _spectra(plotting.MAX_LEGEND_ENTRIES + 3)
    fig = plotting.plot_spectra(spectra, approximate=["layer2"], title="t")
    lines = fig.axes[0].get_lines()
    assert lines[2].get_linestyle() == "--" and lines[0].get_linestyle() == "-"
    assert len(fig.axes) == 2  # the colour bar
    assert fig.axes[0].get_title() == "t"
    few = plotting.plot_spectra(_spectra(2))
    assert few.axes[0].get_legend() is not None and len(few.axes) == 1


def test_draws_on_given_axes():
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
    fig = figure.Figure()
    ax = fig.add_subplot(1, 2, 2)
    assert plotting.plot_spectra(_spectra(2), ax=ax) is fig
    assert len(ax.get_lines()) == 2


def test_png_bytes():
    png = plotting.figure_to_png(plotting.plot_spectra(_spectra(2)))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


@pytest.mark.parametrize("spectra,match", [({}, "at least one"),
                                           ({"a": np.ones((2, 2))}, "1-D")])
def test_bad_input(spectra, match):
    with pytest.raises(ValueError, match=match):
        plotting.plot_spectra(spectra)


def test_library_imports_without_matplotlib():
    # Keras itself imports matplotlib when it is installed, so "not in
    # sys.modules" cannot be checked; blocking the import can.
    code = ("import sys; sys.modules['matplotlib'] = None; "
            "import tfconvnorm, tfconvnorm.plotting, tfconvnorm.checkpoints")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_log_axis_starts_at_the_floor_and_marks_what_lies_below():
    # A strided 1x1 conv's exact zeros come out near 1e-15; they must not set
    # the axis (make demo's figure squeezed every real spectrum into its top tenth).
    spectra = {"conv": np.linspace(10.0, 0.1, 50),
               "shortcut": np.concatenate([np.linspace(2.0, 1.0, 10), np.full(30, 1e-15),
                                           np.zeros(5)])}
    fig = plotting.plot_spectra(spectra)
    ax = fig.axes[0]
    floor = 10.0 * plotting.DEFAULT_LOG_FLOOR
    assert ax.get_ylim()[0] == pytest.approx(floor / 1.5)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["conv", "shortcut", "_below_floor"]
    np.testing.assert_array_equal(lines[1].get_ydata(), np.linspace(2.0, 1.0, 10))
    dotted = lines[2]
    assert dotted.get_linestyle() == ":" and dotted.get_color() == lines[1].get_color()
    assert np.all(dotted.get_ydata() >= floor) and dotted.get_xdata()[-1] == 45
    assert any("below" in t.get_text() for t in ax.texts)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["conv", "shortcut"]
    # Without the floor: non-positive values left out, the 1e-15 ones drawn.
    bare = plotting.plot_spectra(spectra, log_floor=0).axes[0]
    assert len(bare.get_lines()) == 2 and bare.get_lines()[1].get_ydata().min() == 1e-15
