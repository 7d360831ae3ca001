"""The benchmark workloads and the timer they share.

A workload builds *cases*: one input (a layer or a layer set) and the methods
that compete on it. Every method of a case is timed by `run_case` in the same
process, one after the other, so the ratios to tfconvnorm hold even on a noisy
machine. Timing rules (the same for every method):

* one warm-up call first, timed separately as `first_call_s` (for a
  `tf.function` it includes tracing, which is never in the median);
* then up to `repeats` timed calls, stopping early (after at least one) when
  the next would take the timed calls past the per-method time cap
  (`Config.time_cap_s`); the median counts;
* a call's time includes fetching its result to host memory (`.numpy()`), so
  asynchronous GPU work is finished;
* an untraced method (NumPy, eager TF) whose warm-up alone exceeds the cap is
  run once: its warm-up is its measurement, and the row says so.

Nothing is invented: a method that is not run is reported as skipped, with
the reason; an extrapolated total says how it was extrapolated.
"""

import collections
import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf

import tfconvnorm
from benchmarks import alternatives
from tfconvnorm import checkpoints
from tfconvnorm import geometry as geometry_lib
from tfconvnorm import spectral
from tfconvnorm import reference

WORKLOADS = ("figure1", "largest_sv", "spectra", "clip", "breakdown", "padding", "per_step")
DEFAULT_REPEATS = 5
# Per method and case: beyond this many seconds, fewer repeats (at least one).
DEFAULT_TIME_CAP_S = 10.0
# A point of a sweep whose predicted single run exceeds this is skipped
# (unless Config.full), so that the default run stays under ~10 minutes.
DEFAULT_SKIP_ABOVE_S = 30.0
# The bound used for the projection workload (He-init ResNet-32 convs have
# operator norms of about 1.5-5, so every layer is clipped).
CLIP_MAX_NORM = 1.0
# The published protocol: a projection every this many steps.
DEFAULT_CLIP_EVERY = 100
TRAIN_BATCH_SIZE = 128
# The padding workload: MobileNetV2's input size, and the power iterations
# behind its "true" norms.
PADDING_MOBILENET_SIZE = 64
PADDING_POWER_ITERATIONS = 500
# SVD cost grows as c^3 in the channel count; used only to decide what to skip.
_SWEEP_COST_EXPONENT = 3

# Sweeps of the published timing figure: (label, kernel size, input size, channels).
FIGURE1_SWEEPS = (
    ("3x3 conv, 16x16 input", 3, 16, (16, 32, 64, 128, 256, 512)),
    ("11x11 conv, 64x64 input", 11, 64, (16, 32, 64)),
)
# --full adds c = 128 on 64x64: the published NumPy method alone takes ~130 s
# there (its (64, 64, 128, 128) complex128 transform is 1 GiB).
FIGURE1_FULL_SWEEPS = (
    ("3x3 conv, 16x16 input", 3, 16, (16, 32, 64, 128, 256, 512)),
    ("11x11 conv, 64x64 input", 11, 64, (16, 32, 64, 128)),
)
FIGURE1_QUICK_SWEEPS = (
    ("3x3 conv, 16x16 input", 3, 16, (16, 64, 256)),
    ("11x11 conv, 64x64 input", 11, 64, (16, 64)),
)
# Single layers for the largest-singular-value workload: (label, k, n, channels).
LARGEST_SV_LAYERS = (("3x3 conv, 64 channels, 16x16 input", 3, 16, 64),
                     ("3x3 conv, 256 channels, 16x16 input", 3, 16, 256))

REF_NAME = "tfconvnorm"
EAGER_NAME = "tfconvnorm (eager, per layer)"
# The published NumPy method gets float64 kernels: NumPy < 2 (which it was
# written for) always transformed to complex128, and NumPy 2 keeps float32 as
# complex64, whose batched SVD is ~3.5x *slower* than complex128 here. Giving
# it float32 would inflate tfconvnorm's ratios.
PUBLISHED_NUMPY_DTYPE = np.float64


# ---------------------------------------------------------------------------
# Layer sets.


def circular_layer(name, kernel, input_shape, strides=(1, 1), dilation_rate=(1, 1), groups=1):
    """A `checkpoints.LayerRecord` with the published operator's geometry: the
    circular convolution at `input_shape` (what the published methods compute)."""
    geometry = geometry_lib.ConvGeometry(tuple(kernel.shape), tuple(input_shape), tuple(strides),
                                         tuple(dilation_rate), int(groups),
                                         geometry_lib.KIND_CONV, spectral.CIRCULAR)
    return checkpoints.LayerRecord(name, kernel, geometry)


def _unstrided(layer):
    return all(s == 1 for s in layer.geometry.strides)


def he_normal_kernel(shape, rng):
    """A He-normal kernel, as Keras initialises the ResNets' convs."""
    fan_in = int(np.prod(shape[:-1]))
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)


def conv_layer(k, n, c_in, c_out, rng, name=None, strides=1):
    return circular_layer(name or f"{k}x{k}_{c_in}x{c_out}_at{n}",
                 he_normal_kernel((k, k, c_in, c_out), rng), (n, n), (strides, strides))


def _layers_of_model(model):
    """The 2-D convs of a built Keras model as `LayerRecord`s (current kernel values), with
    the published operator's geometry (circular at the layer's input size), which
    the published methods compute."""
    layers = []
    for op in geometry_lib.model_geometry(model, boundary="circular"):
        geometry = op.geometry
        if geometry.kind == "dense" or len(geometry.kernel_shape) != 4:
            continue
        kernel = np.asarray(op.to_spectral(op.variable), dtype=np.float32)
        layers.append(circular_layer(op.name, kernel, geometry.input_shape, geometry.strides,
                                     geometry.dilation_rate, geometry.groups))
    return layers


def resnet32_model(seed=0):
    """CIFAR ResNet-32 V2 at He initialisation (helper module `models.resnet_v2`)."""
    from tfconvnorm.models import resnet_v2  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
    keras.utils.set_random_seed(seed)
    return resnet_v2.cifar_resnet_v2(32)


def resnet32_layers(seed=0):
    """The 34 convs of CIFAR ResNet-32 V2 (1x1 shortcuts included), He init."""
    return _layers_of_model(resnet32_model(seed))


def resnet50v2_layers(seed=0, image_size=224):
    """The 53 convs of ResNet50V2 at `image_size`, with He-normal random kernels.

    Geometry from `checkpoints.architectures.resnet50v2_layer_set` (the layers'
    own, explicitly padded input sizes 230, 58, 30, 16, 9); timings do not
    depend on the kernel values.
    """
    from tfconvnorm.checkpoints import architectures  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(seed)
    layers = []
    for name, shape, geometry in architectures.resnet50v2_layer_set(image_size):
        layers.append(circular_layer(name, he_normal_kernel(shape, rng), geometry.input_shape,
                                     geometry.strides, geometry.dilation_rate, geometry.groups))
    return layers


# ---------------------------------------------------------------------------
# Configuration and timing.


@dataclasses.dataclass
class Config:
    """What to run and how long to spend on it."""

    repeats: int = DEFAULT_REPEATS
    time_cap_s: float = DEFAULT_TIME_CAP_S
    skip_above_s: float = DEFAULT_SKIP_ABOVE_S
    quick: bool = False
    full: bool = False          # run everything: no skips, no extrapolation
    seed: int = 0
    log: Callable[[str], None] = print
    # Overridable for tests: name -> () -> list[LayerRecord] / keras model.
    layer_sets: dict = dataclasses.field(default_factory=lambda: {
        "ResNet-32": resnet32_layers, "ResNet50V2@224": resnet50v2_layers})
    train_model: Optional[Callable[[], Any]] = None  # default: resnet32_model
    # The padding workload's models: name -> (seed) -> built keras model.
    padding_models: dict = dataclasses.field(default_factory=lambda: {
        "ResNet-32": resnet32_model, "MobileNetV2@64": mobilenetv2_model})
    train_input_shape: tuple = (32, 32, 3)
    figure1_sweeps: Optional[tuple] = None
    largest_sv_layers: Optional[tuple] = None

    def __post_init__(self):
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"`repeats` must be a positive int, got {self.repeats!r}.")
        if not self.time_cap_s > 0:
            raise ValueError(f"`time_cap_s` must be positive, got {self.time_cap_s!r}.")
        if not self.skip_above_s > 0:
            raise ValueError(f"`skip_above_s` must be positive, got {self.skip_above_s!r}.")


@dataclasses.dataclass
class Method:
    """One competitor on one case.

    fn: runs the whole case once and returns its numbers (tensors or arrays).
    compiled: fn is a traced `tf.function` (its first call is never a sample).
    setup: untimed, before every call (e.g. restore variables a call changes).
    skip: a reason not to run it (reported instead of a time).
    estimate: instead of fn, a custom timer `estimate(config) -> (stats, output)`
      whose total is extrapolated from timed parts; the row is marked so and
      its `timing_note` says how.
    """

    name: str
    fn: Optional[Callable[[], Any]] = None
    compiled: bool = False
    setup: Optional[Callable[[], None]] = None
    skip: Optional[str] = None
    note: str = ""
    estimate: Optional[Callable[["Config"], tuple]] = None


@dataclasses.dataclass
class Case:
    """Methods competing on one input. `evaluate(outputs)` returns
    {method: {metric: value}} from the methods' outputs (untimed);
    `targets(rows)` returns the issue's targets checked on this case."""

    workload: str
    name: str
    methods: list
    params: dict = dataclasses.field(default_factory=dict)
    reference: str = REF_NAME
    metrics: tuple = ()          # ((key, column label), ...)
    evaluate: Optional[Callable[[dict], dict]] = None
    targets: Optional[Callable[[dict], list]] = None
    notes: list = dataclasses.field(default_factory=list)


def _fetch(output):
    """Brings every tensor of a (nested) output to host memory."""
    return tf.nest.map_structure(lambda t: t.numpy() if tf.is_tensor(t) else t, output)


def _timed_call(fn, setup=None):
    if setup is not None:
        setup()
    start = time.perf_counter()
    output = _fetch(fn())
    return time.perf_counter() - start, output


def time_method(fn, repeats, time_cap_s, compiled=False, setup=None):
    """Times fn by the module's rules; returns (stats dict, last output)."""
    first_s, output = _timed_call(fn, setup)
    if not compiled and first_s >= time_cap_s:
        runs = [first_s]
        note = "one run (over the time cap), no separate warm-up"
    else:
        runs = []
        while len(runs) < repeats:
            elapsed, output = _timed_call(fn, setup)
            runs.append(elapsed)
            if sum(runs) + elapsed > time_cap_s:  # the next run would pass the cap
                break
        note = "" if len(runs) == repeats else f"{len(runs)} of {repeats} repeats (time cap)"
    stats = dict(median_s=statistics.median(runs), runs_s=runs, first_call_s=first_s,
                 repeats=len(runs), timing_note=note)
    return stats, output


def run_case(case, config):
    """Times every method of `case`; returns its JSON-ready result."""
    rows, outputs = [], {}
    for method in case.methods:
        row = dict(method=method.name, note=method.note)
        if method.skip:
            row.update(status="skipped", skip_reason=method.skip, median_s=None)
        else:
            config.log(f"  timing {case.name}: {method.name} ...")
            try:
                if method.estimate is not None:
                    stats, output = method.estimate(config)
                    row.update(status="extrapolated", extrapolated=True, **stats)
                else:
                    stats, output = time_method(method.fn, config.repeats, config.time_cap_s,
                                                method.compiled, method.setup)
                    row.update(status="ok", **stats)
                outputs[method.name] = output
            except Exception as e:  # pylint: disable=broad-except
                # One method failing (e.g. out of memory on a device) must not
                # lose the others' measurements.
                row.update(status="failed", median_s=None,
                           error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                config.log(f"  {method.name} failed: {row['error']}")
        rows.append(row)
    by_name = {row["method"]: row for row in rows}
    ref = by_name.get(case.reference)
    ref_s = ref["median_s"] if ref else None
    for row in rows:
        row["ratio"] = (row["median_s"] / ref_s
                        if row["median_s"] is not None and ref_s else None)
    if case.evaluate is not None:
        metrics = case.evaluate(outputs)
        for row in rows:
            row["metrics"] = {key: _plain(metrics.get(row["method"], {}).get(key))
                              for key, _ in case.metrics}
    result = dict(workload=case.workload, case=case.name, params=case.params,
                  reference=case.reference, metric_labels=dict(case.metrics),
                  rows=rows, notes=list(case.notes))
    result["targets"] = case.targets(by_name) if case.targets else []
    return result


def _plain(value):
    """JSON-friendly scalar (None for missing / non-finite)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _speedup_target(description, rows, method, threshold):
    row = rows.get(method)
    if not row or row.get("ratio") is None:
        return dict(target=description, value=None, threshold=threshold, met=None,
                    note=f"{method} not measured")
    return dict(target=description, value=row["ratio"], threshold=threshold,
                met=row["ratio"] >= threshold,
                note="extrapolated" if row.get("extrapolated") else "")


# ---------------------------------------------------------------------------
# Exactness helpers (untimed).


def _sorted_desc(values):
    return np.sort(np.asarray(values, dtype=np.float64).reshape(-1))[::-1]


def spectrum_error(values, reference_values):
    """max |sigma_i - ref_i| / max(ref): the error of a whole spectrum,
    relative to its largest singular value (multisets compared sorted)."""
    a, b = _sorted_desc(values), _sorted_desc(reference_values)
    if a.shape != b.shape:
        return float("nan")
    return float(np.max(np.abs(a - b)) / max(b[0], np.finfo(np.float64).tiny))


def _compiled_all_layers(layer_fn, layers):
    """One tf.function over the whole layer set; kernels are its arguments."""
    kernels = [tf.constant(layer.kernel) for layer in layers]

    @tf.function
    def run(kernels):
        return [layer_fn(kernel, layer) for kernel, layer in zip(kernels, layers)]

    return lambda: run(kernels)


def _compiled_many(many_fn, layers):
    """One tf.function calling a `*_many` function on the whole layer set."""
    kernels = [tf.constant(layer.kernel) for layer in layers]
    geometries = [layer.geometry.spectral_kwargs() for layer in layers]

    @tf.function
    def run(kernels):
        return many_fn(kernels, geometries)

    return lambda: run(kernels)


def _eager_per_layer(layer_fn, layers):
    kernels = [tf.constant(layer.kernel) for layer in layers]
    return lambda: [layer_fn(kernel, layer) for kernel, layer in zip(kernels, layers)]


def _spectrum(kernel, layer):
    return tfconvnorm.conv_singular_values(kernel, **layer.geometry.spectral_kwargs())


def _norm(kernel, layer):
    return tfconvnorm.conv_operator_norm(kernel, **layer.geometry.spectral_kwargs())


# ---------------------------------------------------------------------------
# Workload 1: the published timing figure.


def _figure1_case(label, k, n, channels, previous, config):
    rng = np.random.default_rng(config.seed)
    layer = conv_layer(k, n, channels, channels, rng)
    kernel_np = layer.kernel.astype(PUBLISHED_NUMPY_DTYPE)
    kernel = tf.constant(layer.kernel)
    spectrum = tf.function(lambda x: tfconvnorm.conv_singular_values(x, (n, n)))
    explicit_entries = (n * n * channels) ** 2

    def predicted_skip(method):
        """Skip a point whose predicted single run (c^3 from the last point) is too long."""
        if config.full or method not in previous:
            return None
        last_c, last_s = previous[method]
        predicted = last_s * (channels / last_c) ** _SWEEP_COST_EXPONENT
        if predicted > config.skip_above_s:
            return (f"predicted ~{predicted:.0f} s per run (c^3 from c={last_c}) > "
                    f"{config.skip_above_s:.0f} s cap; --full runs it")
        return None

    explicit_skip = None
    if explicit_entries > reference.MAX_EXPLICIT_ENTRIES:
        explicit_skip = (f"matrix {n * n * channels}^2 exceeds "
                         f"reference.MAX_EXPLICIT_ENTRIES={reference.MAX_EXPLICIT_ENTRIES}")
    else:
        explicit_skip = predicted_skip("explicit matrix + SVD")
    methods = [
        Method(REF_NAME, lambda: spectrum(kernel), compiled=True,
               note="conv_singular_values in a tf.function"),
        Method("published NumPy", lambda: reference.published_singular_values(kernel_np, (n, n)),
               skip=predicted_skip("published NumPy"),
               note="np.fft.fft2 + np.linalg.svd (float64 kernel, see PUBLISHED_NUMPY_DTYPE)"),
        Method("published TF", lambda: alternatives.published_tf_singular_values(kernel, (n, n)),
               skip=predicted_skip("published TF"), note="tf.signal.fft2d + tf.linalg.svd, eager"),
        Method("explicit matrix + SVD",
               lambda: reference.explicit_singular_values(kernel_np, (n, n)),
               skip=explicit_skip, note="dense (n^2 c)^2 matrix, np.linalg.svd (float64)"),
    ]

    def evaluate(outputs):
        ref = outputs.get(REF_NAME)
        explicit = outputs.get("explicit matrix + SVD")
        result = {}
        for name, values in outputs.items():
            result[name] = {"err_vs_ref": spectrum_error(values, ref)}
            if explicit is not None:
                result[name]["err_vs_explicit"] = spectrum_error(values, explicit)
        return result

    def targets(rows):
        row = rows.get("explicit matrix + SVD")
        if row is None or row.get("ratio") is None:
            return []
        return [_speedup_target("full spectrum >= 1000x faster than the explicit matrix",
                                rows, "explicit matrix + SVD", 1000)]

    return Case("figure1", f"{label}, c_in = c_out = {channels}", methods,
                params=dict(sweep=label, kernel_size=k, input_size=n, channels=channels),
                metrics=(("err_vs_ref", "err vs tfconvnorm"),
                         ("err_vs_explicit", "err vs explicit")),
                evaluate=evaluate, targets=targets)


def figure1(config):
    sweeps = config.figure1_sweeps or (FIGURE1_QUICK_SWEEPS if config.quick else
                                       FIGURE1_FULL_SWEEPS if config.full else FIGURE1_SWEEPS)
    for label, k, n, channel_list in sweeps:
        previous = {}
        for channels in channel_list:
            result = run_case(_figure1_case(label, k, n, channels, previous, config), config)
            for row in result["rows"]:
                if row["median_s"] is not None:
                    previous[row["method"]] = (channels, row["median_s"])
            yield result


# ---------------------------------------------------------------------------
# Workload 2: the largest singular value only.


# The independent float64 check of the oracle runs on layers up to this many channels
# (the published NumPy SVD of a 256-channel layer alone takes ~10-40 s here).
_ORACLE_CHECK_MAX_CHANNELS = 128


def _exact_norms_float64(layers):
    """Oracle: the core in float64 (eigvalsh in complex128, ~1e-14), and the
    published NumPy method in float64 on stride-1 layers as an independent check."""
    exact = np.array([float(_norm(tf.constant(l.kernel, tf.float64), l)) for l in layers])
    checks = [abs(float(np.max(reference.published_singular_values(
        l.kernel.astype(np.float64), l.geometry.input_shape))) - e) / e
              for l, e in zip(layers, exact)
              if _unstrided(l) and l.geometry.dilation_rate == (1, 1) and l.geometry.groups == 1
              and all(k <= n for k, n in zip(l.kernel.shape, l.geometry.input_shape))
              and max(l.kernel.shape[-2:]) <= _ORACLE_CHECK_MAX_CHANNELS]
    return exact, (max(checks) if checks else None), len(checks)


def _largest_sv_case(name, layers, config, with_targets):
    exact, check, checked = _exact_norms_float64(layers)
    iters = alternatives.DEFAULT_POWER_ITERATIONS
    long_iters = 10 * iters
    all_2d = all(l.geometry.groups == 1 for l in layers)

    def power(iterations):
        return lambda kernel, layer: alternatives.operator_power_iteration(
            kernel, layer.geometry.input_shape, layer.geometry.strides, layer.geometry.dilation_rate, iterations=iterations)

    def reshaped(kernel, layer):
        return alternatives.reshaped_kernel_power_iteration(kernel, iterations=iters)

    def gram(kernel, layer):
        g = layer.geometry  # the circular operator, as Delattre et al. bound it
        return alternatives.gram_iteration_norm(kernel, g.input_shape, g.strides,
                                                g.dilation_rate, g.groups)

    skip_power = None if all_2d else "grouped convs: conv2d power iteration needs groups=1"
    methods = [
        Method(REF_NAME, _compiled_many(tfconvnorm.conv_operator_norm_many, layers),
               compiled=True, note="exact: conv_operator_norm_many, one tf.function"),
        Method("tfconvnorm, layer by layer", _compiled_all_layers(_norm, layers), compiled=True,
               note="conv_operator_norm per layer, one tf.function over all layers"),
        Method(EAGER_NAME, _eager_per_layer(_norm, layers),
               note="conv_operator_norm called eagerly for each layer, as users call it"),
        Method(f"power iteration x{iters} (tf.function)",
               _compiled_all_layers(power(iters), layers), compiled=True, skip=skip_power,
               note="conv2d / conv2d_transpose, circular (Model Garden style)"),
        Method(f"power iteration x{iters} (eager)", _eager_per_layer(power(iters), layers),
               skip=skip_power, note="same, one eager call per layer"),
        Method(f"power iteration x{long_iters} (tf.function)",
               _compiled_all_layers(power(long_iters), layers), compiled=True, skip=skip_power),
        Method(f"reshaped-kernel power iteration x{iters}",
               _compiled_all_layers(reshaped, layers), compiled=True,
               note="keras.layers.SpectralNormalization: norm of a different matrix"),
        Method(f"Gram iteration x{alternatives.DEFAULT_GRAM_ITERATIONS}",
               _compiled_all_layers(gram, layers), compiled=True,
               note="Delattre et al. 2023: an upper bound"),
    ]

    def evaluate(outputs):
        result = {}
        for method, values in outputs.items():
            values = np.asarray([float(v) for v in values])
            rel = (values - exact) / exact
            result[method] = {"max_abs_rel_err": np.max(np.abs(rel)),
                              "median_rel_err": np.median(rel)}
        return result

    def targets(rows):
        out = []
        ref = rows.get(REF_NAME)
        err = ref.get("metrics", {}).get("max_abs_rel_err") if ref else None
        out.append(dict(target="largest singular value exact to 1e-5 relative (float32)",
                        value=err, threshold=1e-5, met=None if err is None else err <= 1e-5,
                        note=""))
        if not (ref and ref["median_s"]):
            return out
        power_rows = [rows[m.name] for m in methods if m.name.startswith(f"power iteration x{iters} ")
                      and rows[m.name]["median_s"]]
        fastest = min(power_rows, key=lambda r: r["median_s"]) if power_rows else None
        if with_targets:
            if fastest:
                out.append(dict(
                    target=f"no slower than {iters} power iterations on the operator",
                    value=fastest["median_s"] / ref["median_s"], threshold=1.0,
                    met=ref["median_s"] <= fastest["median_s"],
                    note=f"time ratio of the faster power iteration ({fastest['method']})"))
            eager = rows[EAGER_NAME]["median_s"]
            if eager:
                out.append(dict(target="conv_operator_norm called eagerly per layer within "
                                       "1.3x of the pooled call", value=eager / ref["median_s"],
                                threshold=1.3, met=eager / ref["median_s"] <= 1.3,
                                note="time ratio eager per layer / pooled"))
        elif len(layers) == 1:
            channels = layers[0].kernel.shape[-1]
            long_row = rows[f"power iteration x{long_iters} (tf.function)"]
            if channels >= 256 and long_row["median_s"]:
                out.append(dict(target=f"exact norm at {channels} channels no slower than "
                                       f"{long_iters} power iterations",
                                value=long_row["median_s"] / ref["median_s"], threshold=1.0,
                                met=ref["median_s"] <= long_row["median_s"],
                                note="time ratio power iteration / exact"))
            elif fastest:
                ratio = ref["median_s"] / fastest["median_s"]
                out.append(dict(target=f"exact norm at {channels} channels within 2x of "
                                       f"{iters} power iterations", value=ratio, threshold=2.0,
                                met=ratio <= 2.0, note="time ratio exact / power iteration"))
        return out

    notes = ["relative errors are (estimate - exact) / exact per layer; exact = tfconvnorm "
             "in float64"]
    if check is not None:
        notes.append(f"float64 oracle vs published NumPy float64 on {checked} stride-1 layers: "
                     f"max relative difference {check:.1e}")
    return Case("largest_sv", name, methods,
                params=dict(layers=len(layers)),
                metrics=(("max_abs_rel_err", "max abs rel err"),
                         ("median_rel_err", "median rel err")),
                evaluate=evaluate, targets=targets, notes=notes)


def largest_sv(config):
    rng = np.random.default_rng(config.seed)
    cases = [("ResNet-32 convs", lambda: config.layer_sets["ResNet-32"](config.seed), True)]
    for label, k, n, channels in (config.largest_sv_layers or LARGEST_SV_LAYERS):
        layer = conv_layer(k, n, channels, channels, rng)
        cases.append((label, lambda layer=layer: [layer], False))
    for name, build, with_targets in cases:
        layers = build()
        yield run_case(_largest_sv_case(f"{name} ({len(layers)} layers)" if len(layers) > 1
                                        else name, layers, config, with_targets), config)


# ---------------------------------------------------------------------------
# Workload 3 (issue 5): full spectra of whole networks.


def _representatives(layers, key):
    """[(index of first layer, count)] per distinct key, in order."""
    groups = collections.OrderedDict()
    for index, layer in enumerate(layers):
        groups.setdefault(key(layer), [index, 0])[1] += 1
    return [tuple(v) for v in groups.values()]


# Sampled timing of the published methods: per layer, about this many seconds
# of SVDs are timed (at least _MIN_SAMPLE frequency matrices).
_SAMPLE_BUDGET_S = 0.5
_MIN_SAMPLE = 4
# ResNet-32's layers all fit the budget; the check of the extrapolation on
# them samples at most this fraction so that the scaling is exercised.
_CHECK_SAMPLE_FRACTION = 0.25


def _published_key(layer):
    # The published methods ignore strides: their cost depends on shape and size only.
    return (layer.kernel.shape, layer.geometry.input_shape)


def _sampled_estimate(layers, transforms_fn, svd_fn, max_fraction=1.0):
    """A timer for a published method (FFT, then one SVD per frequency) on a
    whole layer set, without running all of it.

    Per distinct (kernel shape, input size): the FFT is timed in full; the
    batched SVD, whose cost is one LAPACK call per frequency matrix, is timed
    on an evenly spaced sample of the frequency matrices (as many as fit in
    ~_SAMPLE_BUDGET_S, all when they fit, at most `max_fraction` of them) and
    scaled by frequencies / sample. Layers of the same geometry count the same
    time.
    """
    def estimate(config):
        groups = _representatives(layers, _published_key)
        total, timed_runs, sampled, layer_count = 0.0, 0, 0, 0
        for index, count in groups:
            fft_stats, _ = time_method(lambda: transforms_fn(index), config.repeats,
                                       _SAMPLE_BUDGET_S)
            transforms = transforms_fn(index)
            batch = tf.reshape(transforms, [-1] + list(transforms.shape[-2:])) \
                if tf.is_tensor(transforms) else transforms.reshape((-1,) + transforms.shape[-2:])
            frequencies = int(batch.shape[0])

            def take(m):
                picks = np.linspace(0, frequencies - 1, m).round().astype(np.int64)
                return tf.gather(batch, picks) if tf.is_tensor(batch) else batch[picks]

            probe = take(min(frequencies, _MIN_SAMPLE))
            probe_stats, _ = time_method(lambda: svd_fn(probe), 1, _SAMPLE_BUDGET_S)
            per_matrix = probe_stats["median_s"] / int(probe.shape[0])
            m = int(min(frequencies, max(int(probe.shape[0]),
                                         _SAMPLE_BUDGET_S // max(per_matrix, 1e-9)),
                        max(1, math.ceil(max_fraction * frequencies))))
            sample = take(m)
            svd_stats, _ = time_method(lambda: svd_fn(sample), config.repeats, _SAMPLE_BUDGET_S)
            total += count * (fft_stats["median_s"] + svd_stats["median_s"] * frequencies / m)
            timed_runs += fft_stats["repeats"] + svd_stats["repeats"]
            sampled += m < frequencies
            layer_count += count
        note = (f"extrapolated: {len(groups)} distinct kernel shape / input size pairs for "
                f"{layer_count} layers; per pair the FFT timed in full and the SVD on a "
                f"sample of the frequency matrices ({sampled} pairs sampled, the rest in "
                f"full), scaled by frequencies / sample; each pair's time x its layer count")
        stats = dict(median_s=total, runs_s=[], first_call_s=None, repeats=timed_runs,
                     timing_note=note)
        return stats, None
    return estimate


def _spectra_case(set_name, layers, config, threshold, extrapolate, check_extrapolation=False):
    kernels_np = [layer.kernel.astype(PUBLISHED_NUMPY_DTYPE) for layer in layers]
    kernels = [tf.constant(layer.kernel) for layer in layers]

    def published_numpy_all():
        return [reference.published_singular_values(k, l.geometry.input_shape)
                for k, l in zip(kernels_np, layers)]

    def published_tf_all():
        return [alternatives.published_tf_singular_values(k, l.geometry.input_shape)
                for k, l in zip(kernels, layers)]

    # The two halves of the published code, for the sampled timing.
    numpy_estimate = _sampled_estimate(
        layers, lambda i: np.fft.fft2(kernels_np[i], layers[i].geometry.input_shape, axes=[0, 1]),
        lambda batch: np.linalg.svd(batch, compute_uv=False))
    tf_estimate = _sampled_estimate(
        layers, lambda i: alternatives.published_tf_transforms(kernels[i], layers[i].geometry.input_shape),
        lambda batch: tf.linalg.svd(batch, compute_uv=False))

    methods = [
        Method(REF_NAME, _compiled_many(tfconvnorm.conv_singular_values_many, layers),
               compiled=True, note="conv_singular_values_many, one tf.function"),
        Method("tfconvnorm, layer by layer", _compiled_all_layers(_spectrum, layers),
               compiled=True, note="conv_singular_values per layer, one tf.function"),
        Method(EAGER_NAME, _eager_per_layer(_spectrum, layers),
               skip="large layer set: only with --full" if extrapolate else None),
    ]
    numpy_note = "np.fft.fft2 + np.linalg.svd (float64 kernels), per layer; strides ignored"
    tf_note = "tf.signal.fft2d + tf.linalg.svd, eager, per layer; strides ignored"
    if extrapolate:
        methods += [Method("published NumPy", estimate=numpy_estimate, note=numpy_note),
                    Method("published TF", estimate=tf_estimate, note=tf_note)]
    else:
        methods += [Method("published NumPy", published_numpy_all, note=numpy_note),
                    Method("published TF", published_tf_all, note=tf_note)]
        if check_extrapolation:
            methods.append(Method(
                "published NumPy (sampled, as for large sets)",
                estimate=_sampled_estimate(
                    layers,
                    lambda i: np.fft.fft2(kernels_np[i], layers[i].geometry.input_shape, axes=[0, 1]),
                    lambda batch: np.linalg.svd(batch, compute_uv=False),
                    max_fraction=_CHECK_SAMPLE_FRACTION),
                note=f"checks the extrapolation against the full run above (SVD timed on at "
                     f"most {_CHECK_SAMPLE_FRACTION:.0%} of each layer's frequencies)"))

    def evaluate(outputs):
        result = {}
        ref = outputs.get(REF_NAME)
        if ref is None:
            return result
        for method, values in outputs.items():
            if values is None:   # extrapolated timings have no spectra
                continue
            errors = [spectrum_error(v, ref[i]) for i, v in enumerate(values)
                      if _unstrided(layers[i])]
            result[method] = {"err_vs_ref": max(errors) if errors else None,
                              "layers_compared": len(errors)}
        return result

    def targets(rows):
        out = [_speedup_target(f"full spectra of {set_name} >= {threshold}x faster than "
                               f"the published NumPy method", rows, "published NumPy",
                               threshold)]
        eager, ref = rows[EAGER_NAME].get("median_s"), rows[REF_NAME].get("median_s")
        if eager and ref:
            out.append(dict(target="conv_singular_values called eagerly per layer within 1.3x "
                                   "of the pooled call", value=eager / ref, threshold=1.3,
                            met=eager / ref <= 1.3, note="time ratio eager per layer / pooled"))
        return out

    notes = ["errors: max over stride-1 layers of max|sigma - sigma_tfconvnorm| / sigma_max "
             "(the published methods ignore strides, so strided layers are not comparable)"]
    if extrapolate:
        notes.append("published methods extrapolated (see the row notes); --full runs them on "
                     "every layer")
    return Case("spectra", f"{set_name}: all {len(layers)} convs", methods,
                params=dict(layer_set=set_name, layers=len(layers),
                            extrapolated=bool(extrapolate)),
                metrics=(("err_vs_ref", "err vs tfconvnorm"),
                         ("layers_compared", "layers compared")),
                evaluate=evaluate, targets=targets, notes=notes)


def spectra(config):
    for set_name, threshold, big in (("ResNet-32", 25, False), ("ResNet50V2@224", 50, True)):
        if big and config.quick:
            config.log("  spectra: ResNet50V2 skipped in --quick mode")
            continue
        layers = config.layer_sets[set_name](config.seed)
        yield run_case(_spectra_case(set_name, layers, config, threshold,
                                     extrapolate=big and not config.full,
                                     check_extrapolation=not big), config)


# ---------------------------------------------------------------------------
# Workload 4 (issue 3): projecting every conv kernel vs one training step.


def clip(config):
    import keras  # pylint: disable=g-import-not-at-top
    from tfconvnorm import layer_norms  # pylint: disable=g-import-not-at-top
    model = (config.train_model or (lambda: resnet32_model(config.seed)))()
    # The published operator, as the published clip it is compared with.
    operators = geometry_lib.model_geometry(model, kinds=geometry_lib.CONV_KINDS,
                                            boundary="circular")
    variables = [op.variable for op in operators]
    initial = [np.array(v.numpy()) for v in variables]

    def restore():
        for variable, value in zip(variables, initial):
            variable.assign(value)

    def clipper_call(method, compute_norms):
        # The OperatorNormClipper's compiled projection (all kernels, one call, assigned).
        project = layer_norms.make_projection_fn(operators, CLIP_MAX_NORM, method=method,
                                               compute_norms=compute_norms)

        def call():
            project()
            return [v.value for v in variables]
        return call

    def published():
        return [alternatives.published_tf_clip(op.to_spectral(v), op.geometry.input_shape,
                                               CLIP_MAX_NORM)
                for op, v in zip(operators, variables)]

    rng = np.random.default_rng(config.seed)
    images = rng.standard_normal((TRAIN_BATCH_SIZE,) + tuple(config.train_input_shape)) \
        .astype(np.float32)
    labels = rng.integers(0, model.output_shape[-1], TRAIN_BATCH_SIZE)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def train_step():
        return model.train_on_batch(images, labels)

    default_name = "tfconvnorm clipper default (paper + norms logged)"
    alternating_name = "tfconvnorm method='alternating'"
    step_name = f"training step (batch {TRAIN_BATCH_SIZE})"
    methods = [
        Method(REF_NAME, clipper_call("paper", False), compiled=True, setup=restore,
               note="layer_norms.make_projection_fn(method='paper', compute_norms=False): the "
                    "published single clip, all convs in one tf.function, assigned"),
        Method(default_name, clipper_call("paper", True), compiled=True, setup=restore,
               note="OperatorNormClipper's defaults: also the norm of every kernel before "
                    "and after"),
        Method(alternating_name, clipper_call("alternating", False), compiled=True,
               setup=restore, note="4 clip rounds + rescale: guarantees the bound"),
        Method("published TF (eager, per layer)", published, setup=restore,
               note="FFT, full SVD with U and V, clip, inverse FFT, truncate"),
        Method(step_name, train_step, compiled=True,
               note="model.train_on_batch, SGD with momentum, random data"),
    ]

    def evaluate(outputs):
        result = {}
        for method, kernels in outputs.items():
            if method == step_name:
                continue
            ratios = [float(tfconvnorm.conv_operator_norm(op.to_spectral(k),
                                                          **op.geometry.spectral_kwargs()))
                      / CLIP_MAX_NORM for op, k in zip(operators, kernels)]
            result[method] = {"norm_after": max(ratios)}
        return result

    def targets(rows):
        out = []
        step = rows[step_name]["median_s"]
        projection = rows[REF_NAME]["median_s"]
        share = projection / (DEFAULT_CLIP_EVERY * step) if projection and step else None
        out.append(dict(target=f"the paper's projection every {DEFAULT_CLIP_EVERY} steps <= 1% "
                               "of training time", value=share, threshold=0.01,
                        met=None if share is None else share <= 0.01,
                        note=f"projection / ({DEFAULT_CLIP_EVERY} training steps)"))
        for name in (REF_NAME, default_name, alternating_name):
            projection = rows[name]["median_s"]
            share = projection / step if projection and step else None
            out.append(dict(target=f"one projection of all convs <= 10% of one training step "
                                   f"({name})", value=share, threshold=0.10,
                            met=None if share is None else share <= 0.10,
                            note="time ratio projection / step"))
        return out

    notes = ["every projection starts from the same unclipped He-init kernels (restored "
             "untimed before each call): a kernel already inside the ball is cheap for "
             "'alternating'",
             "'max norm after / bound': the largest exact operator norm after projection; "
             "the published single clip does not guarantee <= 1"]
    case = Case("clip", f"project all {len(operators)} convs of {model.name} "
                f"(max_norm={CLIP_MAX_NORM})", methods,
                params=dict(layers=len(operators), max_norm=CLIP_MAX_NORM,
                            batch_size=TRAIN_BATCH_SIZE),
                metrics=(("norm_after", "max norm after / bound"),),
                evaluate=evaluate, targets=targets, notes=notes)
    result = run_case(case, config)
    restore()
    yield result


# ---------------------------------------------------------------------------
# Workload 5: where the time goes (stages; on a GPU, which ops leave it).


def _precomputed_grams(layers, complex_dtype):
    """Every layer's per-frequency Gram matrices (the smaller side), as the core
    forms them, pooled by size: the input of the decomposition alone."""
    real_dtype = complex_dtype.real_dtype
    pools = collections.OrderedDict()
    for layer in layers:
        matrices, _ = tfconvnorm.conv_transfer_matrices(tf.constant(layer.kernel, real_dtype),
                                                        **layer.geometry.spectral_kwargs())
        rows, cols = matrices.shape[-2:]
        if min(rows, cols) == 1:
            continue
        matrices = tf.reshape(tf.cast(matrices, complex_dtype), (-1, rows, cols))
        gram = tf.matmul(matrices, matrices, adjoint_b=rows <= cols, adjoint_a=rows > cols)
        pools.setdefault(tuple(gram.shape[-2:]), []).append(gram)
    return [tf.concat(grams, 0) for grams in pools.values()]


def _decomposition_only(layers, complex_dtype, decompose):
    grams = _precomputed_grams(layers, complex_dtype)
    run = tf.function(lambda grams: [decompose(g) for g in grams])
    return lambda: run(grams)


def breakdown(config):
    rng = np.random.default_rng(config.seed)
    channels = 64 if config.quick else 128
    single = conv_layer(3, 16, channels, channels, rng)
    cases = [("ResNet-32 convs", config.layer_sets["ResNet-32"](config.seed)),
             (f"{single.name}", [single])]
    for name, layers in cases:
        def matrices(kernel, layer):
            # complex64 for float32 kernels, as conv_singular_values builds them
            return tfconvnorm.conv_transfer_matrices(kernel, **layer.geometry.spectral_kwargs())[0]

        def published_fft(kernel, layer):
            return alternatives.published_tf_transforms(kernel, layer.geometry.input_shape)

        def published_svd(kernel, layer):
            return alternatives.published_tf_singular_values(kernel, layer.geometry.input_shape)

        methods = [
            Method(REF_NAME, _compiled_many(tfconvnorm.conv_singular_values_many, layers),
                   compiled=True,
                   note="full spectrum (transfer matrices + eigvalsh, SVD fallback), pooled"),
            Method("tfconvnorm: transfer matrices only", _compiled_all_layers(matrices, layers),
                   compiled=True, note="conv_transfer_matrices, complex64"),
            Method("tfconvnorm: operator norm",
                   _compiled_many(tfconvnorm.conv_operator_norm_many, layers),
                   compiled=True, note="transfer matrices + Gram-iteration bounds + eigvalsh of candidates"),
            Method("floor of the full spectrum: eigvalsh alone",
                   _decomposition_only(layers, tf.complex128, tf.linalg.eigvalsh),
                   compiled=True,
                   note="complex128 eigvalsh of every Gram matrix the full spectrum needs "
                        "(precomputed, pooled by size): what exactness cannot skip"),
            Method("floor of the projection: eigh alone",
                   _decomposition_only(layers, tf.complex64, tf.linalg.eigh), compiled=True,
                   note="complex64 eigh (vectors too) of every Gram matrix, precomputed: what "
                        "the per-frequency clip cannot skip when every frequency is over"),
            Method("published TF: FFT only", _compiled_all_layers(published_fft, layers),
                   compiled=True, note="tf.signal.fft2d"),
            Method("published TF: FFT + SVD", _compiled_all_layers(published_svd, layers),
                   compiled=True, note="tf.linalg.svd, complex: no GPU kernel"),
        ]
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or ["CPU"]
        yield run_case(Case("breakdown", f"{name} ({len(layers)} layers)", methods,
                            params=dict(layers=len(layers), devices=devices),
                            notes=["all rows in one tf.function per method; the difference "
                                   "between rows is the time of the stage they add"]), config)


# ---------------------------------------------------------------------------
# Workload 6 (issue 10): the bounds of zero-padded layers, their cost and tightness.


def mobilenetv2_model(seed=0, image_size=PADDING_MOBILENET_SIZE):
    """keras.applications.MobileNetV2 (random weights): depthwise convs with
    strides on odd feature-map sizes."""
    import keras  # pylint: disable=g-import-not-at-top
    keras.utils.set_random_seed(seed)
    return keras.applications.MobileNetV2(weights=None, include_top=False,
                                          input_shape=(image_size, image_size, 3))


def _model_operators(model, boundary="layer"):
    """(operators, kernels in the conv layout) of a model's convs."""
    operators = geometry_lib.model_geometry(model, kinds=geometry_lib.CONV_KINDS,
                                            boundary=boundary, round_up=True)
    return operators, [tf.constant(op.to_spectral(op.variable.numpy())) for op in operators]


def _long_power_iteration(kernels, geometries, iterations):
    """Power iteration on each real layer (`tfconvnorm.spectral.apply_convolution`,
    its own zero padding; adjoint by autodiff): ||A v|| / ||v||, an estimate from
    below of each layer's norm, independent of the DFT."""
    from tfconvnorm.spectral import operator  # pylint: disable=g-import-not-at-top
    runs = []
    for kernel, geometry in zip(kernels, geometries):
        g = operator.Geometry(kernel.shape, **geometry.spectral_kwargs())

        @tf.function
        def run(kernel, g=g):
            x = tf.random.stateless_normal((1,) + g.layer_input_shape + (g.c_in,), seed=[5, 6])

            def step(_, x):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    energy = 0.5 * tf.reduce_sum(tf.square(
                        tfconvnorm.spectral.apply_convolution(x, kernel, g)))
                z = tape.gradient(energy, x)
                return _ + 1, z / tf.norm(z)

            _, x = tf.while_loop(lambda i, _: i < iterations, step, (0, x))
            return tf.norm(tfconvnorm.spectral.apply_convolution(x, kernel, g)) / tf.norm(x)
        runs.append(run)
    return lambda: [run(kernel) for run, kernel in zip(runs, kernels)]


def padding(config):
    """Speed: the padding-aware norm against the circular one (ResNet-32).
    Tightness: each layer's certified interval against a long power iteration
    on the real layer (ResNet-32 and MobileNetV2)."""
    iterations = 50 if config.quick else PADDING_POWER_ITERATIONS
    for set_name, build in config.padding_models.items():
        model = build(config.seed)
        operators, kernels = _model_operators(model)
        circular, _ = _model_operators(model, boundary="circular")
        geometries = [op.geometry for op in operators]
        upper_name, lower_name = "upper bound (circular on N)", "certified interval (bounds_many)"
        power_name = f"power iteration x{iterations} on the layer"
        circular_name = "circular operator at the input size (not a bound)"

        @tf.function
        def uppers(kernels):
            return tfconvnorm.conv_operator_norm_many(kernels, geometries)

        @tf.function
        def circular_norms(kernels):
            return tfconvnorm.conv_operator_norm_many(kernels, [op.geometry for op in circular])

        def interval():
            bounds = tfconvnorm.conv_operator_norm_bounds_many(kernels, geometries)
            return [b.lower for b in bounds]

        methods = [
            Method(upper_name, lambda: uppers(kernels), compiled=True,
                   note="conv_operator_norm_many with the layers' own padding, one tf.function"),
            Method(circular_name, lambda: circular_norms(kernels), compiled=True,
                   note="the published operator: conv_operator_norm_many, padding='circular'"),
            Method(lower_name, interval,
                   note=f"conv_operator_norm_bounds_many: float64 upper bounds + Lanczos "
                        f"x{tfconvnorm.DEFAULT_POWER_ITERATIONS} on each layer (lower shown)"),
            Method(power_name, _long_power_iteration(kernels, geometries, iterations),
                   note="an independent estimate from below of each layer's norm"),
        ]

        def evaluate(outputs):
            values = {m: np.asarray([float(v) for v in out]) for m, out in outputs.items()}
            if upper_name not in values or power_name not in values:
                return {}
            # The best value known from below (the true norm is in [best, upper]).
            best = np.maximum(values[power_name], values.get(lower_name, 0))
            result = {}
            for method, value in values.items():
                ratio = value / best
                result[method] = {"median_ratio": np.median(ratio), "min_ratio": np.min(ratio),
                                  "max_ratio": np.max(ratio)}
            return result

        def targets(rows):
            circ = rows[circular_name]["median_s"]
            padded = rows[upper_name]["median_s"]
            share = padded / circ if padded and circ else None
            return [dict(target="padding-aware norm of every conv <= 1.2x the circular one",
                         value=share, threshold=1.2, met=None if share is None else share <= 1.2,
                         note="time ratio")] if set_name == "ResNet-32" else []

        notes = ["ratios are value / best, best = max(power iteration, certified lower bound) "
                 "per layer: the true norm lies in [best, upper], so upper / best "
                 "over-states the upper bound's gap and lower / best under-states the lower's",
                 "the circular row is the published operator at the layer's input size; "
                 "its ratio < 1 on some layer means it is not an upper bound there"]
        yield run_case(Case("padding", f"{set_name}: {len(operators)} convs with their own "
                            "padding", methods, reference=upper_name,
                            params=dict(layer_set=set_name, layers=len(operators),
                                        power_iterations=iterations),
                            metrics=(("median_ratio", "median / best"),
                                     ("min_ratio", "min / best"),
                                     ("max_ratio", "max / best")),
                            evaluate=evaluate, targets=targets, notes=notes), config)


# ---------------------------------------------------------------------------
# Workload 7 (issue 13): what users pay per step, and large Dense kernels.


def _training_step(config, method):
    """A compiled batch-128 training step of a fresh model, with `constrain(...,
    method=method)` on its convs (None: unconstrained)."""
    import keras  # pylint: disable=g-import-not-at-top
    model = (config.train_model or (lambda: resnet32_model(config.seed)))()
    if method is not None:
        tfconvnorm.constrain(model, CLIP_MAX_NORM, method=method, kinds=geometry_lib.CONV_KINDS)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(config.seed)
    images = rng.standard_normal((TRAIN_BATCH_SIZE,) + tuple(config.train_input_shape)) \
        .astype(np.float32)
    labels = rng.integers(0, model.output_shape[-1], TRAIN_BATCH_SIZE)
    return lambda: model.train_on_batch(images, labels)


def per_step(config):
    plain = f"training step (batch {TRAIN_BATCH_SIZE})"
    methods = [Method(plain, _training_step(config, None), compiled=True,
                      note="model.train_on_batch, SGD with momentum, random data")]
    for method in ("rescale", "alternating"):
        methods.append(Method(f"step with constrain(method={method!r})",
                              _training_step(config, method), compiled=True,
                              note="OperatorNormConstraint on every conv, applied by Keras "
                                   "after every optimizer step"))

    def targets(rows):
        base = rows[plain]["median_s"]
        out = []
        for name in (m.name for m in methods[1:]):
            step = rows[name]["median_s"]
            extra = (step - base) / base if step and base else None
            out.append(dict(target=f"{name} adds <= 10% to a training step", value=extra,
                            threshold=0.10, met=None if extra is None else extra <= 0.10,
                            note="(constrained - plain) / plain"))
        return out

    yield run_case(Case("per_step", "constrain(model, 1.0): a training step's cost", methods,
                        reference=plain, params=dict(batch_size=TRAIN_BATCH_SIZE),
                        targets=targets,
                        notes=["each row is a freshly built model; the constrained ones "
                               "start at He init, so the first steps rescale every conv"]),
                   config)
    size = 512 if config.quick else 4096
    rng = np.random.default_rng(config.seed)
    dense = (rng.standard_normal((size, size)) / math.sqrt(size)).astype(np.float32)
    exact = float(np.linalg.norm(dense.astype(np.float64), 2))
    numpy_name = "np.linalg.norm(w, 2)"
    case = Case("per_step", f"norm of one {size}x{size} Dense kernel", [
        Method(REF_NAME, lambda: tfconvnorm.conv_operator_norm(dense, ()),
               note="conv_operator_norm (a real float64 Gram matrix and eigvalsh)"),
        Method(numpy_name, lambda: np.linalg.norm(dense, 2), note="float32 SVD (LAPACK)")],
        params=dict(size=size), metrics=(("rel_err", "rel err vs float64 SVD"),),
        evaluate=lambda outputs: {m: {"rel_err": abs(float(v) - exact) / exact}
                                  for m, v in outputs.items()},
        targets=lambda rows: [dict(
            target=f"{size}x{size} Dense norm within 1.5x of np.linalg.norm(w, 2)",
            value=rows[REF_NAME]["median_s"] / rows[numpy_name]["median_s"]
            if rows[REF_NAME]["median_s"] and rows[numpy_name]["median_s"] else None,
            threshold=1.5,
            met=(rows[REF_NAME]["median_s"] <= 1.5 * rows[numpy_name]["median_s"])
            if rows[REF_NAME]["median_s"] and rows[numpy_name]["median_s"] else None,
            note="time ratio tfconvnorm / NumPy")])
    yield run_case(case, config)


WORKLOAD_FUNCTIONS = dict(figure1=figure1, largest_sv=largest_sv, spectra=spectra, clip=clip,
                          breakdown=breakdown, padding=padding, per_step=per_step)
