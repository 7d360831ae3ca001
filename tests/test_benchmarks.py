"""Tests of the benchmark harness and of the competing methods' correctness.

The alternatives must be right for the comparison to mean anything: each is
checked against an independent oracle (the explicit operator matrix, NumPy's
SVD, the published NumPy code) or against `tfconvnorm.conv_operator_norm`.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfconvnorm
from benchmarks import alternatives
from benchmarks import lipschitz_certificate
from benchmarks import run
from benchmarks import workloads
from tfconvnorm import reference

# (kernel size, input size, c_in, c_out, stride, dilation)
GEOMETRIES = [
    (3, 8, 3, 4, 1, 1),
    (3, 8, 4, 3, 2, 1),
    (3, 5, 2, 3, 1, 2),   # dilated
    (5, 4, 2, 3, 1, 1),   # kernel larger than the input: taps wrap
    (1, 6, 5, 3, 2, 1),   # strided 1x1
]


def _kernel(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _explicit_matrix_of(fn, n, c_in):
    """Dense matrix of a linear map on (1, n, n, c_in) tensors, by columns."""
    columns = []
    for index in range(n * n * c_in):
        basis = np.zeros(n * n * c_in)
        basis[index] = 1.0
        columns.append(np.asarray(fn(tf.constant(basis.reshape(1, n, n, c_in)))).reshape(-1))
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("k,n,c_in,c_out,s,d", GEOMETRIES)
def test_circular_conv2d_is_the_reference_operator(k, n, c_in, c_out, s, d):
    kernel = _kernel((k, k, c_in, c_out))
    matrix = _explicit_matrix_of(lambda x: alternatives.circular_conv2d(x, kernel, s, d), n, c_in)
    np.testing.assert_allclose(matrix, reference.explicit_operator_matrix(kernel, (n, n), s, d),
                               atol=1e-12)


@pytest.mark.parametrize("k,n,c_in,c_out,s,d", GEOMETRIES)
def test_circular_conv2d_transpose_is_the_adjoint(k, n, c_in, c_out, s, d):
    rng = np.random.default_rng(1)
    kernel = _kernel((k, k, c_in, c_out))
    x = tf.constant(rng.standard_normal((1, n, n, c_in)))
    y = alternatives.circular_conv2d(x, kernel, s, d)
    z = tf.constant(rng.standard_normal(y.shape))
    back = alternatives.circular_conv2d_transpose(z, kernel, (n, n), s, d)
    assert back.shape == x.shape
    np.testing.assert_allclose(float(tf.reduce_sum(y * z)), float(tf.reduce_sum(x * back)),
                               rtol=1e-10)


@pytest.mark.parametrize("k,n,c_in,c_out,s,d", GEOMETRIES)
def test_operator_power_iteration_converges_to_the_exact_norm(k, n, c_in, c_out, s, d):
    kernel = _kernel((k, k, c_in, c_out), seed=2)
    exact = float(tfconvnorm.conv_operator_norm(kernel, (n, n), s, d))
    few = float(alternatives.operator_power_iteration(kernel, (n, n), s, d, iterations=2))
    many = float(tf.function(lambda w: alternatives.operator_power_iteration(
        w, (n, n), s, d, iterations=3000))(tf.constant(kernel)))
    assert few <= exact * (1 + 1e-12)
    np.testing.assert_allclose(many, exact, rtol=1e-6)


def test_operator_power_iteration_in_a_tf_function_matches_eager():
    kernel = tf.constant(_kernel((3, 3, 4, 4), dtype=np.float32))
    compiled = tf.function(lambda w: alternatives.operator_power_iteration(w, (8, 8), 2))
    np.testing.assert_allclose(float(compiled(kernel)),
                               float(alternatives.operator_power_iteration(kernel, (8, 8), 2)),
                               rtol=1e-6)


def test_operator_power_iteration_rejects_a_stride_that_does_not_divide():
    with pytest.raises(ValueError, match="strides"):
        alternatives.operator_power_iteration(_kernel((3, 3, 2, 2)), (7, 7), 2)


@pytest.mark.parametrize("k,n,c_in,c_out,s,d", GEOMETRIES)
def test_gram_iteration_is_an_upper_bound_that_tightens(k, n, c_in, c_out, s, d):
    kernel = _kernel((k, k, c_in, c_out), seed=3)
    exact = float(tfconvnorm.conv_operator_norm(kernel, (n, n), s, d))
    bounds = [float(alternatives.gram_iteration_norm(kernel, (n, n), s, d, iterations=t))
              for t in (1, 3, 6, 12)]
    assert all(b >= exact * (1 - 1e-12) for b in bounds)
    assert all(a >= b * (1 - 1e-12) for a, b in zip(bounds, bounds[1:]))
    np.testing.assert_allclose(bounds[-1], exact, rtol=5e-3)


def test_gram_iteration_handles_large_and_zero_kernels():
    kernel = _kernel((3, 3, 4, 4), seed=4, dtype=np.float32) * 1e4  # sigma^(2^t) would overflow
    exact = float(tfconvnorm.conv_operator_norm(kernel, (8, 8)))
    bound = float(alternatives.gram_iteration_norm(kernel, (8, 8), iterations=10))
    assert exact * (1 - 1e-5) <= bound <= exact * 1.01  # float32: a bound up to rounding
    assert float(alternatives.gram_iteration_norm(np.zeros((3, 3, 2, 2), np.float32), 8)) == 0.0


def test_reshaped_kernel_power_iteration_is_the_reshaped_matrix_norm():
    kernel = _kernel((3, 3, 4, 5), seed=5)
    expected = np.linalg.svd(kernel.reshape(-1, 5), compute_uv=False)[0]
    estimate = float(alternatives.reshaped_kernel_power_iteration(kernel, iterations=500))
    np.testing.assert_allclose(estimate, expected, rtol=1e-8)
    # ... which is not the operator norm: the point of the comparison.
    assert estimate < 0.9 * float(tfconvnorm.conv_operator_norm(kernel, (8, 8)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reshaped_kernel_power_iteration_matches_keras_spectral_normalization(seed):
    keras.utils.set_random_seed(seed)
    layer = keras.layers.Conv2D(5, 3, kernel_initializer="he_normal")
    # Converged (both start from random vectors): the same sigma as Keras divides by.
    wrapped = keras.layers.SpectralNormalization(layer, power_iterations=500)
    wrapped.build((None, 8, 8, 4))
    kernel = layer.kernel.numpy()
    normalized = wrapped.normalized_weights()
    keras_sigma = np.linalg.norm(kernel) / np.linalg.norm(np.asarray(normalized[1]))
    ours = float(alternatives.reshaped_kernel_power_iteration(kernel, iterations=500))
    np.testing.assert_allclose(ours, keras_sigma, rtol=1e-4)


@pytest.mark.parametrize("shape,n", [((3, 3, 4, 6), 8), ((1, 1, 6, 4), 5), ((11, 11, 2, 2), 16)])
def test_published_tf_matches_the_published_numpy_code(shape, n):
    kernel = _kernel(shape, seed=6, dtype=np.float32)
    ours = np.sort(alternatives.published_tf_singular_values(kernel, (n, n)).numpy().ravel())
    theirs = np.sort(reference.published_singular_values(kernel, (n, n)).ravel())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.max())
    clipped = alternatives.published_tf_clip(kernel, (n, n), 1.0).numpy()
    assert clipped.shape == shape and clipped.dtype == np.float32
    np.testing.assert_allclose(clipped, reference.published_clip(kernel, (n, n), 1.0), atol=1e-5)


def test_published_tf_clip_rejects_a_bad_bound():
    with pytest.raises(ValueError, match="max_norm"):
        alternatives.published_tf_clip(_kernel((3, 3, 2, 2)), (8, 8), 0.0)


# ---------------------------------------------------------------------------
# The harness.


def test_time_method_respects_repeats_and_the_time_cap(monkeypatch):
    clock = [0.0]  # virtual: only `slow` advances it
    monkeypatch.setattr(workloads.time, "perf_counter", lambda: clock[0])
    calls = []
    stats, output = workloads.time_method(lambda: calls.append(1) or np.ones(2), repeats=3,
                                          time_cap_s=10.0)
    assert stats["repeats"] == 3 and len(calls) == 4  # one warm-up, three samples
    assert stats["median_s"] == sorted(stats["runs_s"])[1]
    np.testing.assert_array_equal(output, np.ones(2))

    slow_calls = []

    def slow():
        slow_calls.append(1)
        clock[0] += 0.05
    stats, _ = workloads.time_method(slow, repeats=5, time_cap_s=0.01)
    # Over the cap and untraced: the first call is the single measurement.
    assert stats["repeats"] == 1 and len(slow_calls) == 1 and "one run" in stats["timing_note"]
    stats, _ = workloads.time_method(slow, repeats=5, time_cap_s=0.01, compiled=True)
    assert stats["repeats"] == 1 and len(slow_calls) == 3  # warm-up never counts


def test_run_case_ratios_skips_and_metrics():
    case = workloads.Case(
        "demo", "demo case",
        [workloads.Method("tfconvnorm", lambda: np.array([2.0, 1.0])),
         workloads.Method("other", lambda: np.array([2.0, 1.5])),
         workloads.Method("not run", skip="too slow"),
         workloads.Method("broken", lambda: 1 / 0)],
        metrics=(("err", "err"),),
        evaluate=lambda outputs: {k: {"err": workloads.spectrum_error(v, outputs["tfconvnorm"])}
                                  for k, v in outputs.items()})
    result = workloads.run_case(case, workloads.Config(repeats=2, log=lambda m: None))
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["tfconvnorm"]["ratio"] == 1.0
    assert rows["other"]["ratio"] > 0
    assert rows["other"]["metrics"]["err"] == pytest.approx(0.25)
    assert rows["not run"]["status"] == "skipped" and rows["not run"]["median_s"] is None
    assert rows["broken"]["status"] == "failed" and "ZeroDivisionError" in rows["broken"]["error"]
    text = run.format_case(result)
    assert "demo case" in text and "skipped" in text and "too slow" in text


def _tiny_layers(seed=0):
    rng = np.random.default_rng(seed)
    return [workloads.conv_layer(3, 8, 3, 4, rng, "a"),
            workloads.conv_layer(3, 8, 4, 4, rng, "b", strides=2),
            workloads.conv_layer(1, 8, 4, 4, rng, "c"),
            workloads.conv_layer(3, 8, 4, 4, rng, "d")]  # same geometry as "b" but unstrided


def _tiny_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="tiny")


def _tiny_config():
    return workloads.Config(
        layer_sets={"ResNet-32": _tiny_layers, "ResNet50V2@224": _tiny_layers},
        train_model=_tiny_model, train_input_shape=(8, 8, 3),
        padding_models={"ResNet-32": lambda seed: _tiny_model()},
        figure1_sweeps=(("3x3 conv, 6x6 input", 3, 6, (2, 4)),),
        largest_sv_layers=(("3x3 conv, 4 channels", 3, 6, 4),))


@pytest.mark.slow
def test_run_main_smoke(tmp_path):
    json_path = tmp_path / "out" / "results.json"
    figure = tmp_path / "figure1.png"
    payload = run.main(["--quick", "--repeats", "1", "--json", str(json_path),
                        "--figure", str(figure)], config=_tiny_config())
    assert figure.stat().st_size > 0
    saved = json.loads(json_path.read_text())
    assert saved["config"]["quick"] and saved["machine"]["cpu_count"] >= 1
    assert {r["workload"] for r in saved["results"]} == set(workloads.WORKLOADS)
    assert [p.name for p in json_path.parent.iterdir()] == ["results.json"]  # no temp left
    for result in payload["results"]:
        rows = {r["method"]: r for r in result["rows"]}
        assert rows[result["reference"]]["ratio"] == 1.0
        assert not [r for r in rows.values() if r["status"] == "failed"], result
        assert all(r["median_s"] > 0 for r in rows.values() if r["status"] != "skipped")

    markdown = run.format_markdown(saved)
    assert "| tfconvnorm |" in markdown and "complete" in markdown

    by_workload = {}
    for result in saved["results"]:
        by_workload.setdefault(result["workload"], []).append(result)
    # Padding: the upper bound is never below the best value known from below,
    # the certified lower bound never above it.
    padding_rows = {r["method"]: r for r in by_workload["padding"][0]["rows"]}
    assert padding_rows["upper bound (circular on N)"]["metrics"]["min_ratio"] >= 1 - 1e-6
    assert padding_rows["certified interval (bounds_many)"]["metrics"]["max_ratio"] <= 1 + 1e-9
    # Figure 1: every method agrees with the explicit matrix.
    for result in by_workload["figure1"]:
        for row in result["rows"]:
            assert row["metrics"]["err_vs_explicit"] < 1e-5, row
    # Largest singular value: exact to 1e-5; the power iteration underestimates.
    resnet = by_workload["largest_sv"][0]
    rows = {r["method"]: r for r in resnet["rows"]}
    assert rows["tfconvnorm"]["metrics"]["max_abs_rel_err"] < 1e-5
    assert rows["power iteration x100 (tf.function)"]["metrics"]["median_rel_err"] <= 1e-6
    assert rows["Gram iteration x6"]["metrics"]["median_rel_err"] >= -1e-5
    # Spectra: the published methods agree on the stride-1 layers (3 of 4).
    spectra = {r["method"]: r for r in by_workload["spectra"][0]["rows"]}
    assert spectra["published NumPy (sampled, as for large sets)"]["extrapolated"]
    assert spectra["published NumPy"]["metrics"]["layers_compared"] == 3
    assert spectra["published NumPy"]["metrics"]["err_vs_ref"] < 1e-5
    # Clipping: ours meets the bound.
    clip_rows = {r["method"]: r for r in by_workload["clip"][0]["rows"]}
    assert clip_rows["tfconvnorm method='alternating'"]["metrics"]["norm_after"] <= 1 + 1e-4
    # The published single clip in TF is the same algorithm as method='paper'.
    np.testing.assert_allclose(clip_rows["published TF (eager, per layer)"]["metrics"]["norm_after"],
                               clip_rows["tfconvnorm"]["metrics"]["norm_after"], rtol=1e-4)
    assert by_workload["clip"][0]["targets"][0]["value"] > 0


def test_spectra_extrapolated_rows_are_labelled():
    config = workloads.Config(repeats=1, log=lambda m: None)
    result = workloads.run_case(
        workloads._spectra_case("tiny", _tiny_layers(), config, 1, extrapolate=True),  # pylint: disable=protected-access
        config)
    rows = {r["method"]: r for r in result["rows"]}
    for name in ("published NumPy", "published TF"):
        assert rows[name]["status"] == "extrapolated" and rows[name]["extrapolated"]
        assert rows[name]["median_s"] > 0 and "extrapolated" in rows[name]["timing_note"]
        assert rows[name]["metrics"]["err_vs_ref"] is None  # no spectra, no error claimed
    assert "(extrap.)" in run.format_case(result)


def test_sampled_estimate_scales_the_svd_sample(monkeypatch):
    """The SVD is timed on a sample of the frequency matrices and scaled up;
    layers of the same geometry are timed once and counted twice. A virtual
    clock (the fake SVD advances it, nothing else does) makes the estimate
    exact instead of a wall-clock range."""
    monkeypatch.setattr(workloads, "_SAMPLE_BUDGET_S", 0.05)
    seconds_per_matrix = 5e-4
    clock = [0.0]
    monkeypatch.setattr(workloads.time, "perf_counter", lambda: clock[0])
    batches = []

    def fake_svd(batch):
        batches.append(len(batch))
        clock[0] += seconds_per_matrix * len(batch)

    layers = _tiny_layers()[:1] * 2
    frequencies = 400
    estimate = workloads._sampled_estimate(  # pylint: disable=protected-access
        layers, lambda i: np.zeros((frequencies, 2, 2)), fake_svd)
    stats, output = estimate(workloads.Config(repeats=1, log=lambda m: None))
    assert output is None and max(batches) < frequencies
    # Two layers x all 400 matrices at 0.5 ms, from a sample of fewer.
    assert stats["median_s"] == pytest.approx(2 * frequencies * seconds_per_matrix, rel=1e-9)
    assert "1 pairs sampled" in stats["timing_note"]


def test_parse_args_rejects_unknown_workloads():
    with pytest.raises(SystemExit):
        run.parse_args(["--workloads", "figure1,nope"])
    with pytest.raises(SystemExit):
        run.parse_args(["--repeats", "0"])


def test_lipschitz_certificate_brackets_the_constant(tmp_path, capsys):
    """The script's two numbers bracket the model's Lipschitz constant: for a
    linear model (conv -> conv, no activation) the true constant is the norm
    of its explicit matrix, which lies between them; so a bound too low or a
    lower estimate too high fails here."""
    keras.utils.set_random_seed(11)
    inputs = keras.Input((32, 32, 1))  # digits images
    x = keras.layers.Conv2D(2, 3, strides=2, padding="same", name="a")(inputs)
    x = keras.layers.Conv2D(1, 3, padding="same", name="b")(x)
    model = keras.Model(inputs, keras.layers.Flatten(name="flat")(x))
    path = str(tmp_path / "linear.keras")
    model.save(path)
    out = str(tmp_path / "rows.json")
    (row,) = lipschitz_certificate.main([path, "--examples=2", "--steps=20", f"--json={out}"])
    zero = model(np.zeros((1, 32, 32, 1), np.float32)).numpy()
    true = np.linalg.norm(reference.function_matrix(lambda v: model(v).numpy() - zero,
                                                    (32, 32, 1)), 2)
    assert row["empirical_lower_bound"] <= true * (1 + 1e-4)
    assert true <= row["lipschitz_upper_bound"]
    assert row["empirical_lower_bound"] > 0.9 * true  # power iteration finds it on a linear map
    assert row["ratio"] == pytest.approx(row["lipschitz_upper_bound"] / row["empirical_lower_bound"])
    assert set(row["top_contributors"]) <= {"a", "b", "flat"}
    assert json.load(open(out))["rows"][0]["model"] == path
    assert "| certified upper bound |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["missing.keras"], "model file not found: 'missing.keras'"),
    (["--examples=0", "x"], "--examples must be >= 1, got 0"),
])
def test_lipschitz_certificate_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        lipschitz_certificate.parse_args(argv)
    assert message in capsys.readouterr().err
