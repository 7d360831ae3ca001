"""benchmarks/reproduce.py: the small-scale paper experiment, run in its --quick mode
through the real training code; what it writes is checked against the runs'
own results.json and history.json, read here independently."""

import csv
import json
import os

import numpy as np
import pytest

from benchmarks import reproduce

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reproduce"))
    arms = reproduce.main([f"--output_dir={out}", "--quick"])
    return out, arms


def _run_files(out, arm, seed=0):
    run_dir = os.path.join(out, "runs", arm, f"seed{seed}")
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(run_dir, "history.json")) as f:
        history = json.load(f)["epochs"]
    return results, history


@pytest.mark.slow
def test_quick_run_writes_table_and_figures_consistent_with_its_runs(quick_run):
    out, arms = quick_run
    with open(os.path.join(out, "results.json")) as f:
        written = json.load(f)
    assert [a["arm"] for a in written["arms"]] == ["baseline", "clip1"] == [a["arm"] for a in arms]
    assert written["protocol"]["clip_method"] == "paper"
    assert written["protocol"]["epochs"] == 2 and written["seeds"] == 1
    assert written["command"] == f"python -m benchmarks.reproduce --output_dir={out} --quick"

    for arm in written["arms"]:
        results, history = _run_files(out, arm["arm"])
        # The flags the run recorded are the protocol's: same data, same schedule.
        for key in ("depth", "train_examples", "batch_size", "epochs", "clip_every"):
            assert results["flags"][key] == written["protocol"][key], key
        assert results["clip_to"] == arm["clip_to"]
        assert results["num_train_examples"] == written["protocol"]["train_examples"]
        assert arm["runs"] == 1
        assert arm["test_error_mean"] == pytest.approx(results["test_error"])
        assert arm["test_error_std"] is None  # one seed: no spread to report
        assert arm["wall_time_mean_s"] == pytest.approx(results["wall_time_s"])
        assert arm["lipschitz_upper_bound_mean"] == pytest.approx(
            results["lipschitz_upper_bound"])
        # The figures' data are the histories: fig2 per epoch, fig4 against time.
        for curve, x_key, y in [("fig2_loss", "epoch", [h["loss"] for h in history]),
                                ("fig2_test_error", "epoch",
                                 [1 - h["val_accuracy"] for h in history]),
                                ("fig4_test_error", "train_time_s",
                                 [1 - h["val_accuracy"] for h in history])]:
            plotted = written["curves"][curve][arm["arm"]]
            np.testing.assert_allclose(plotted["x"], [h[x_key] for h in history])
            np.testing.assert_allclose(plotted["mean"], y)
            np.testing.assert_allclose(plotted["min"], y)
        assert history[-1]["val_accuracy"] == pytest.approx(results["last_epoch_val_accuracy"])
    clipped, _ = _run_files(out, "clip1")
    assert clipped["steps"] == 4  # 64 images at batch 32, 2 epochs: projections at 2 and 4
    assert clipped["final_projection"]["method"] == "paper"

    # The table and the CSVs say the same as results.json.
    with open(os.path.join(out, "table.md")) as f:
        table = f.read().splitlines()
    assert len(table) == 2 + len(written["arms"])
    for line, arm in zip(table[2:], written["arms"]):
        assert line.startswith(f"| {arm['arm']} | 1 | {100 * arm['test_error_mean']:.2f}% ± n/a |")
    with open(os.path.join(out, "runs.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["arm"], int(r["seed"])) for r in rows] == [("baseline", 0), ("clip1", 0)]
    for row, run in zip(rows, written["runs"]):
        assert float(row["test_error"]) == pytest.approx(run["test_error"])
    with open(os.path.join(out, "summary.csv")) as f:
        summary = list(csv.DictReader(f))
    assert [float(r["test_error_mean"]) for r in summary] == pytest.approx(
        [a["test_error_mean"] for a in written["arms"]])
    for name in ("fig2", "fig4"):
        path = os.path.join(out, f"{name}.png")
        assert written["figures"][name] == path
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC

    # Run again: every run directory is finished, so nothing trains or
    # re-evaluates (which would overwrite wall times) and the same numbers come back.
    stamps = [os.stat(os.path.join(out, "runs", a["arm"], "seed0", "results.json")).st_mtime_ns
              for a in arms]
    again = reproduce.main([f"--output_dir={out}", "--quick"])
    assert again == arms
    assert stamps == [os.stat(os.path.join(out, "runs", a["arm"], "seed0",
                                            "results.json")).st_mtime_ns for a in arms]


def test_summary_statistics_over_seeds():
    rows = [dict(arm="clip1", clip_to=1.0, seed=s, test_error=e, wall_time_s=10.0 + s,
                 train_time_s=8.0, max_conv_operator_norm=1.0, lipschitz_upper_bound=3.0)
            for s, e in enumerate([0.10, 0.14, 0.12])]
    (arm,) = reproduce.summarize(rows)
    assert arm["runs"] == 3
    assert arm["test_error_mean"] == pytest.approx(0.12)
    assert arm["test_error_std"] == pytest.approx(0.02)  # sample std (ddof = 1)
    assert (arm["test_error_min"], arm["test_error_max"]) == (0.10, 0.14)
    assert arm["wall_time_mean_s"] == pytest.approx(11.0)
    assert "| clip1 | 3 | 12.00% ± 2.00 | 10.00–14.00% |" in reproduce.markdown_table([arm])


def test_curves_are_mean_and_range_over_seeds():
    histories = {"a": [[dict(epoch=1, loss=1.0), dict(epoch=2, loss=0.5)],
                       [dict(epoch=1, loss=3.0), dict(epoch=2, loss=0.7), dict(epoch=3, loss=0.1)]]}
    x, mean, low, high = reproduce._curves(histories, "epoch", lambda e: e["loss"])["a"]  # pylint: disable=protected-access
    np.testing.assert_allclose(x, [1, 2])  # only the epochs every seed reached
    np.testing.assert_allclose(mean, [2.0, 0.6])
    np.testing.assert_allclose(low, [1.0, 0.5])
    np.testing.assert_allclose(high, [3.0, 0.7])


@pytest.mark.parametrize("argv,message", [
    (["--clip_to=1,x"], "--clip_to must be comma-separated numbers, got '1,x'"),
    (["--clip_to=0"], "--clip_to must be finite numbers > 0, got '0'"),
    (["--seeds=0"], "--seeds must be >= 1, got 0"),
    (["--epochs=0"], "--epochs must be >= 1, got 0"),
    (["--dataset=imagenet"], "invalid choice: 'imagenet'"),
])
def test_bad_arguments_name_the_flag_and_value(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        reproduce.parse_args([f"--output_dir={tmp_path}"] + argv)
    assert message in capsys.readouterr().err


def test_defaults_are_the_papers_protocol(tmp_path):
    args = reproduce.parse_args([f"--output_dir={tmp_path}"])
    assert args.clip_values == (0.5, 1.0, 2.0) and args.seeds == 3
    settings = reproduce.protocol(args)
    assert (settings["clip_every"], settings["clip_method"]) == (100, "paper")
    assert settings["depth"] == 20 and settings["dataset"] == "digits"
    cifar = reproduce.protocol(reproduce.parse_args(
        [f"--output_dir={tmp_path}", "--dataset=cifar10", "--data_dir=/data"]))
    assert (cifar["depth"], cifar["epochs"], cifar["batch_size"]) == (32, 182, 128)
    assert cifar["data_dir"] == "/data" and "train_examples" not in cifar
