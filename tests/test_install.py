"""`pip install .` gives working command-line tools, from any directory.

A fresh virtual environment gets the package by a non-editable `pip install`
of this checkout; its dependencies (TensorFlow and the rest, too large to
download in a test) come from the test's own environment through a `.pth`
file, so what is checked is the package itself: that it installs every module
the tools need, installs no generic top-level names, and that
`tfconvnorm-analyze` and `tfconvnorm-train` run outside the checkout.
"""

import json
import os
import pathlib
import shutil
import site
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(command, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.mark.slow
def test_pip_install_gives_working_tools(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    installed = pathlib.Path(_run([str(python), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"], tmp_path)
                             .stdout.strip())
    (installed / "_test_dependencies.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n")
    # From a copy, as from a clean clone: the in-tree build leaves build/ behind.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "runs",
        "demo_output"))
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
          str(source)], tmp_path)
    names = {p.name for p in installed.iterdir()}
    assert "tfconvnorm" in names
    assert not names & {"models", "train", "analyze", "demo", "benchmarks", "tests"}
    # The installed copy, not the checkout's, and every subpackage with it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([str(python), "-c", "import tfconvnorm.cli.train, tfconvnorm.checkpoints, "
                  "tfconvnorm.models.cifar_input as m; print(m.__file__)"], elsewhere).stdout
    assert where.strip().startswith(str(installed))

    # A small .keras model to analyse, written by the test's own interpreter.
    model_path = elsewhere / "small.keras"
    _run([sys.executable, "-c",
          "import keras; m = keras.Sequential([keras.Input((9, 9, 2)), "
          "keras.layers.Conv2D(3, 3, strides=2, padding='same'), keras.layers.Flatten(), "
          f"keras.layers.Dense(2)]); m.save({str(model_path)!r})"], elsewhere)
    _run([str(venv / "bin" / "tfconvnorm-analyze"), f"--checkpoint={model_path}",
          "--output_dir=out", "--bound_iterations=4"], elsewhere)
    assert sorted(os.listdir(elsewhere / "out")) == ["spectra.npz", "spectra.png",
                                                      "summary.csv"]
    _run([str(venv / "bin" / "tfconvnorm-train"), "--dataset=digits", "--depth=8",
          "--epochs=1", "--max_steps=2", "--spectra_every_n_epochs=0",
          "--bn_recalibration_batches=1", "--progress=none", "--model_dir=run"], elsewhere)
    results = json.loads((elsewhere / "run" / "results.json").read_text())
    assert results["steps"] == 2 and results["flags"]["dataset"] == "digits"
