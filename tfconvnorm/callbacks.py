"""Keras callbacks: periodic operator-norm projection and TensorBoard spectra.
(BN re-estimation, which a clipped model needs before inference, is
`tfconvnorm.batch_norm`; its names stay importable from here.)

Both find the model's operator layers and their input sizes themselves
(`tfconvnorm.model_geometry`) and do all layers in one compiled
`tf.function` call (`tfconvnorm.layer_norms`), not one eager call per layer.
The math is `tfconvnorm.spectral`'s (TensorFlow): under Keras' JAX and PyTorch backends
the kernels are copied to NumPy, the same compiled call runs on the host, and
the clipper assigns its results back (all after every kernel is computed).
TensorBoard events are written with `tf.summary` on every backend.
"""

import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tfconvnorm.batch_norm import (  # noqa: F401  (re-exported: their first home)
    DEFAULT_BATCH_NORM_BATCHES, PreciseBatchNorm, check_batch_norm_data,
    recalibrate_batch_norm)
from tfconvnorm.layer_norms import (  # noqa: F401  (also importable from here, their first home)
    DEFAULT_CLIPPER_METHOD, make_bounds_fn, make_projection_fn, make_spectra_fn)
from tfconvnorm.spectral.arguments import check_method, check_positive, check_positive_int
from tfconvnorm import geometry as geometry_lib
from tfconvnorm import lipschitz as lipschitz_lib
from tfconvnorm import plotting
from tfconvnorm import spectral

#: The published experiments projected every 100 steps with the single clip.
DEFAULT_EVERY_N_STEPS = 100
#: Subdirectory of `log_dir` for the spectra, beside keras.callbacks.TensorBoard's
#: "train" and "validation".
SPECTRA_SUBDIR = "spectra"


def optimizer_step(model):
    """The model's optimizer step (0 without an optimizer). Via keras.ops, not
    int(): under a strategy `iterations` is a distributed variable."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return 0
    step = int(keras.ops.convert_to_numpy(optimizer.iterations))
    # Up to Keras 3.4 a LossScaleOptimizer (mixed_float16) counts its steps on
    # the inner optimizer only, and its own `iterations` stays 0.
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        step = max(step, int(keras.ops.convert_to_numpy(inner.iterations)))
    return step


class _OperatorCallback(keras.callbacks.Callback):
    """What both callbacks share: the model's operators and their compiled
    functions, built once per model, and the every-N-steps trigger."""

    def __init__(self, every_n_steps, layers, kinds, geometry_kwargs):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.kinds = kinds
        self.geometry_kwargs = geometry_kwargs
        self._cache = None  # (model, operators, *compiled functions)
        self._last_step = 0

    def _for_model(self, build):
        """(model, operators, *build(operators)), rebuilt when the model changes."""
        if self._cache is None or self._cache[0] is not self.model:
            operators = geometry_lib.model_geometry(
                self.model, layers=self.layers, kinds=self.kinds, **self.geometry_kwargs)
            self._cache = (self.model, operators) + tuple(build(operators))
        return self._cache

    def _start_counting(self):
        self._last_step = optimizer_step(self.model)

    def _crossed_a_multiple(self):
        """(step, whether the last batch passed a multiple of every_n_steps)."""
        step = optimizer_step(self.model)
        crossed = (self.every_n_steps is not None
                   and step // self.every_n_steps > self._last_step // self.every_n_steps)
        self._last_step = step
        return step, crossed


class OperatorNormClipper(_OperatorCallback):
    """Projects kernels onto an operator-norm ball every N training steps.

    This is how the published experiments (Sedghi et al., ICLR 2019) kept the
    norms bounded: train freely, and every `every_n_steps` steps replace each
    convolution kernel by its clipped version. The geometry of every layer
    is read from the model; all kernels are projected in one compiled call
    (`make_projection_fn`). Each projection logs (absl, INFO) the largest
    operator norm before and after.

    Steps are the optimizer's iterations: a projection runs after steps N,
    2N, ...; with `steps_per_execution > 1`, at the first callback after each
    multiple of N.

    Args:
      max_norm: the bound, a finite number > 0.
      every_n_steps: steps between projections.
      method: "paper" (default here: the published single clip, which may
        leave norms slightly above the bound), "alternating" (guarantees it)
        or "exact"; see `tfconvnorm.clip_conv_singular_values`.
      layers: layer names (or kernel variable paths) to project; default all
        operator layers.
      kinds: operator kinds to project (e.g. `tfconvnorm.CONV_KINDS` to leave
        Dense layers alone); default all.
      iterations: see `tfconvnorm.clip_conv_singular_values`.
      log_norms: compute and log the norms before/after (the norms before
        mostly come from the projection's own decomposition; the norms after
        cost one more decomposition per kernel and projection).
      batch_norm_data: a dataset of (inputs, labels) batches, or None. When
        given, every projection is followed by `recalibrate_batch_norm` on
        `batch_norm_batches` of its batches. A projection changes the convs at
        once, while the BN moving averages follow over ~1/(1 - momentum) steps:
        without this, evaluation between projections uses statistics of other
        weights, and its accuracy can fall to chance though training is fine.
      batch_norm_batches: batches per re-estimation (an integer >= 1).
      **geometry_kwargs: `input_shape`, `layer_input_shapes`, `boundary`,
        `round_up`, as for `tfconvnorm.model_geometry`. By default each
        operator is the layer's own (zero-padded) one.

    Usage:

    >>> clipper = OperatorNormClipper(1.0, every_n_steps=100)
    >>> model.fit(x, y, callbacks=[clipper])
    """

    def __init__(self, max_norm, every_n_steps=DEFAULT_EVERY_N_STEPS,
                 method=DEFAULT_CLIPPER_METHOD, layers=None, kinds=None, iterations=None,
                 log_norms=True, batch_norm_data=None,
                 batch_norm_batches=DEFAULT_BATCH_NORM_BATCHES, **geometry_kwargs):
        super().__init__(check_positive_int(every_n_steps, "every_n_steps"), layers, kinds,
                         geometry_kwargs)
        self.batch_norm_data = check_batch_norm_data(batch_norm_data, "batch_norm_data")
        self.batch_norm_batches = check_positive_int(batch_norm_batches, "batch_norm_batches")
        self.max_norm = check_positive(max_norm, "max_norm")
        check_method(method)
        self.method = method
        self.iterations = iterations
        self.log_norms = log_norms
        #: The latest projection: {"step", "names", "before", "after"}.
        self.last_projection = None

    def _projection(self):
        def build(operators):
            fn = make_projection_fn(operators, self.max_norm, self.method, self.iterations,
                                    compute_norms=self.log_norms)
            # Trace now (seconds for a deep network), not in the middle of training.
            fn.get_concrete_function()
            return (fn,)
        return self._for_model(build)

    @property
    def operators(self):
        """The `LayerOperator`s this clipper projects (needs `set_model`)."""
        return self._projection()[1]

    def on_train_begin(self, logs=None):
        self._projection()  # fail early on bad geometry, not after N steps
        self._start_counting()

    def on_train_batch_end(self, batch, logs=None):
        step, crossed = self._crossed_a_multiple()
        if crossed:
            self.project_now(step)

    def project_now(self, step=None):
        """Projects every kernel now; returns `{name: (norm_before, norm_after)}`.

        Norms are NaN when `log_norms` is False.
        """
        _, operators, fn = self._projection()
        step = optimizer_step(self.model) if step is None else step
        before, after = (t.numpy() for t in fn())
        if self.batch_norm_data is not None:
            recalibrate_batch_norm(self.model, self.batch_norm_data, self.batch_norm_batches)
        if not self.log_norms:
            before = after = np.full(len(operators), np.nan, np.float32)
        names = [op.name for op in operators]
        self.last_projection = dict(step=step, names=names, before=before, after=after)
        if self.log_norms:
            worst = int(np.argmax(before))
            logging.info("OperatorNormClipper step %d: largest operator norm %.5g (%s) before "
                         "projection, %.5g after (bound %g, %d kernels).", step,
                         before[worst], names[worst], float(np.max(after)), self.max_norm,
                         len(names))
        return {name: (float(b), float(a)) for name, b, a in zip(names, before, after)}


class SpectrumLogger(_OperatorCallback):
    """Writes every layer's singular values to TensorBoard.

    Per kernel (tag suffix: the variable path, e.g. "conv2d/kernel"):
    a histogram `spectrum/<path>` of all singular values, and scalars
    `sigma_max/<path>`, `sigma_min/<path>`, `condition_number/<path>`
    (inf when sigma_min is 0) of that spectrum; with `log_bounds`, also the
    certified interval of the layer's norm, `sigma_max_lower/<path>` and
    `sigma_max_upper/<path>` (`tfconvnorm.conv_operator_norm_bounds_many`).
    Plus, when matplotlib is installed, one image `spectra` with the sorted
    spectra of all layers on log-log axes, and, with `log_lipschitz`, the
    scalar `lipschitz_upper_bound`: the certified bound on the whole model's
    l2 Lipschitz constant in inference (`tfconvnorm.lipschitz_bound`), when
    every layer of the model has a rule (otherwise a warning, once). Written with `tf.summary` to
    `log_dir/spectra`, beside `keras.callbacks.TensorBoard` logs, at the
    optimizer's step.

    Which spectrum: for a zero-padded layer (the default, `boundary="layer"`)
    that of the circular convolution on its embedding size N, cut to the
    layer's number of singular values: entry i bounds the layer's i-th
    singular value from above (so `sigma_min` and the condition number are
    those of the bound, not the layer's). With `boundary="circular"`, the
    published circular operator's exact spectrum.

    Args:
      log_dir: TensorBoard log directory.
      every_n_epochs: log after every N-th epoch (None: never at epoch ends).
      every_n_steps: also log every N optimizer steps (None: never).
      layers, kinds: which operators, as for `tfconvnorm.model_geometry`.
      log_image: write the spectra image (needs matplotlib).
      log_bounds: also log the certified norm interval (Lanczos on each real
        layer: a few forward and backward passes of every layer).
      bound_iterations: Lanczos iterations for the lower bounds.
      log_lipschitz: also log the model's certified Lipschitz upper bound.
      **geometry_kwargs: `input_shape`, `layer_input_shapes`, `boundary`,
        `round_up`, as for `tfconvnorm.model_geometry`. By default each
        operator is the layer's own (zero-padded) one.

    Usage:

    >>> model.fit(x, y, callbacks=[keras.callbacks.TensorBoard("logs"),
    ...                            SpectrumLogger("logs")])
    """

    def __init__(self, log_dir, every_n_epochs=1, every_n_steps=None, layers=None, kinds=None,
                 log_image=True, log_bounds=True,
                 bound_iterations=spectral.DEFAULT_POWER_ITERATIONS, log_lipschitz=True,
                 **geometry_kwargs):
        super().__init__(check_positive_int(every_n_steps, "every_n_steps", allow_none=True),
                         layers, kinds, geometry_kwargs)
        if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
            raise ValueError(f"`log_dir` must be a path; received log_dir={log_dir!r}.")
        self.log_dir = os.fspath(log_dir)
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs",
                                                  allow_none=True)
        self.log_image = log_image
        self.log_bounds = log_bounds
        self.bound_iterations = bound_iterations
        self.log_lipschitz = log_lipschitz
        #: The latest `tfconvnorm.LipschitzBound` (None: not logged or unsupported).
        self.last_lipschitz = None
        self._writer = None
        #: The latest certified norm intervals, `{name: (lower, upper)}`.
        self.last_bounds = None

    def _spectra(self):
        def build(operators):
            if not operators:
                raise ValueError(f"Model '{self.model.name}' has no operator layers to log.")
            fn = make_spectra_fn(operators)
            fn.get_concrete_function()
            return fn, (make_bounds_fn(operators, self.bound_iterations) if self.log_bounds
                        else None)
        return self._for_model(build)

    def _get_writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, SPECTRA_SUBDIR))
        return self._writer

    def on_train_begin(self, logs=None):
        self._spectra()
        self._start_counting()

    def on_train_batch_end(self, batch, logs=None):
        step, crossed = self._crossed_a_multiple()
        if crossed:
            self.log_now(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0:
            self.log_now()

    def _lipschitz(self):
        input_shape = self.geometry_kwargs.get("input_shape")
        try:
            return lipschitz_lib.lipschitz_bound(self.model, input_shape=input_shape)
        except ValueError as error:
            logging.warning("SpectrumLogger: no Lipschitz bound for model '%s' (%s); not "
                            "logging lipschitz_upper_bound.", self.model.name, error)
            self.log_lipschitz = False
            return None

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def log_now(self, step=None):
        """Computes and writes the spectra now; returns `{name: spectrum}` (NumPy).

        The certified norm intervals, when logged, are left in `last_bounds`:
        `{name: (lower, upper)}`.
        """
        _, operators, fn, bounds_fn = self._spectra()
        step = optimizer_step(self.model) if step is None else int(step)
        spectra = [values.numpy() for values in fn()]
        bounds = None
        if bounds_fn is not None:
            lower, upper = (b.numpy() for b in bounds_fn())
            bounds = {op.name: (float(lo), float(up))
                      for op, lo, up in zip(operators, lower, upper)}
        self.last_bounds = bounds
        writer = self._get_writer()
        with writer.as_default(step=step):
            for op, values in zip(operators, spectra):
                sigma_max = float(values[0])
                sigma_min = float(values[-1])
                condition = sigma_max / sigma_min if sigma_min > 0 else float("inf")
                tf.summary.histogram(f"spectrum/{op.name}", values)
                tf.summary.scalar(f"sigma_max/{op.name}", sigma_max)
                tf.summary.scalar(f"sigma_min/{op.name}", sigma_min)
                tf.summary.scalar(f"condition_number/{op.name}", condition)
                if bounds is not None:
                    tf.summary.scalar(f"sigma_max_lower/{op.name}", bounds[op.name][0])
                    tf.summary.scalar(f"sigma_max_upper/{op.name}", bounds[op.name][1])
            if self.log_lipschitz:
                self.last_lipschitz = self._lipschitz()
                if self.last_lipschitz is not None:
                    tf.summary.scalar("lipschitz_upper_bound", float(self.last_lipschitz))
            if self.log_image:
                png = plotting.spectra_figure_png([op.name for op in operators], spectra,
                                          geometry_lib.spectra_title([op.geometry for op in operators]))
                if png is not None:
                    tf.summary.image("spectra", tf.image.decode_png(png, channels=4)[None])
        writer.flush()
        return {op.name: values for op, values in zip(operators, spectra)}
