r"""Trains a CIFAR ResNet V2, optionally projecting every conv onto an operator-norm ball.

Reproduces the experiment of Sedghi, Gupta, Long (ICLR 2019): a pre-activation
ResNet trained on CIFAR-10 with the TF Model Garden recipe, with and without
clipping the singular values of every convolution every 100 steps.

    python train.py --dataset=cifar10 --depth=32 --model_dir=/tmp/resnet32_base
    python train.py --dataset=cifar10 --depth=32 --clip_to=1.0 --model_dir=/tmp/resnet32_clip

With --clip_to, every conv kernel is projected every --clip_every steps with
--clip_method ("paper": the published single clip), and the last epoch ends
on a projection with --final_clip_method ("alternating" by default, which
guarantees every conv's exact operator norm <= clip_to * (1 + 1e-4)). Then
BatchNormalization statistics are re-estimated on training batches, since
the running averages lag behind the projections (baseline runs too).

The binary only parses and checks flags; `train_and_evaluate(config, model_dir)`
does the work (tests call it directly). Killed and restarted with the same
--model_dir, it resumes from the last completed epoch. Under `model_dir`:

    config.json    the TrainConfig (dataset, depth, num_classes, input_shape, ...)
    checkpoints/   per-epoch tf.train.Checkpoint(model=model) files (CheckpointManager)
    backup/        keras.callbacks.BackupAndRestore state: a killed run resumes here
    logs/          TensorBoard: train/, validation/ (Keras), spectra/ (SpectrumLogger)
    model.keras    the final model
    results.json   test accuracy/error, each layer's final operator norm, wall time, flags
"""

import dataclasses
import json
import math
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import keras
import numpy as np
import tensorflow as tf

from models import cifar_input
from models import resnet_v2
from tfconvnorm import callbacks as tfcn_callbacks
from tfconvnorm import geometry as tfcn_geometry
from tfconvnorm import lipschitz as tfcn_lipschitz
from tfconvnorm import spectral as tfcn_spectral

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")
PROGRESS = {"bar": 1, "epoch": 2, "none": 0}
# The Model Garden CIFAR recipe: lr 0.1 per 128 images, x0.1 at epochs 91, 136
# and 182 of 182. With another --epochs the boundaries keep these fractions.
BASE_LEARNING_RATE = 0.1
BASE_BATCH_SIZE = 128
RECIPE_EPOCHS = 182
RECIPE_BOUNDARIES = (91, 136, 182)
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
# Flags that may change when a run is resumed in the same model_dir: where the
# data lives, how the run is executed or reported, and how long it runs.
_RESUMABLE_CHANGES = frozenset({
    "data_dir", "manual_dir", "download", "strategy", "tpu", "progress", "max_steps",
    "epochs", "spectra_every_n_epochs", "checkpoints_to_keep", "validation_freq",
    "bn_recalibration_batches"})


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; `dataclasses.asdict` is JSON-serialisable.

    `None` fields are resolved in `__post_init__`: `learning_rate` to
    0.1 * batch_size / 128, `lr_boundaries` to the recipe's 91/136/182 epochs
    scaled to `epochs`, `num_classes` and `input_shape` from the dataset.
    """
    dataset: str = "cifar10"
    data_dir: str = None
    manual_dir: str = None
    download: bool = True
    depth: int = 32
    epochs: int = RECIPE_EPOCHS
    batch_size: int = BASE_BATCH_SIZE
    learning_rate: float = None
    lr_boundaries: tuple = None    # epochs at which the learning rate is multiplied by lr_decay
    lr_decay: float = 0.1
    weight_decay: float = 2e-4     # tf.nn.l2_loss sense: loss += wd * sum(w**2) / 2
    momentum: float = 0.9
    clip_to: float = None          # None: the baseline, no projection
    clip_every: int = tfcn_callbacks.DEFAULT_EVERY_N_STEPS
    clip_method: str = tfcn_callbacks.DEFAULT_CLIPPER_METHOD
    # Which operator the periodic projections act on: "layer" (each conv's own
    # zero padding: the bound then holds for the layer the model computes) or
    # "circular" (the published experiment: the circular operator at the
    # layer's input size). The final projection is always "layer".
    clip_boundary: str = tfcn_geometry.BOUNDARY_LAYER
    # The projection that ends training. "alternating" guarantees every conv
    # ends within clip_to * (1 + 1e-4); "paper" (the published single clip,
    # also used every clip_every steps) may leave norms above clip_to.
    final_clip_method: str = "alternating"
    spectra_every_n_epochs: int = 1  # 0: no spectra in TensorBoard
    strategy: str = "default"
    tpu: str = None
    mixed_precision: bool = False
    seed: int = 0
    max_steps: int = None          # stop after this many optimizer steps in total
    checkpoints_to_keep: int = 10  # 0: keep every epoch's checkpoint
    validation_freq: int = 1       # evaluate on the test split every N epochs
    shuffle_buffer: int = cifar_input.DEFAULT_SHUFFLE_BUFFER
    # Batches of training data over which BN statistics are re-estimated at the
    # end (after the final projection); 0 keeps the running averages.
    bn_recalibration_batches: int = 100
    progress: str = "bar"          # Keras progress output: bar, epoch (a line each), none
    num_classes: int = None
    input_shape: tuple = None

    def __post_init__(self):
        if self.learning_rate is None and _is_number(self.batch_size):
            self.learning_rate = BASE_LEARNING_RATE * self.batch_size / BASE_BATCH_SIZE
        if self.lr_boundaries is None and _is_number(self.epochs):
            self.lr_boundaries = tuple(
                round(b * self.epochs / RECIPE_EPOCHS, 3) for b in RECIPE_BOUNDARIES)
        elif isinstance(self.lr_boundaries, (list, tuple)):
            self.lr_boundaries = tuple(self.lr_boundaries)
        if self.dataset in cifar_input.DATASETS:
            info = cifar_input.DATASETS[self.dataset]
            if self.num_classes is None:
                self.num_classes = info.num_classes
            if self.input_shape is None:
                self.input_shape = info.image_shape
        if isinstance(self.input_shape, list):
            self.input_shape = tuple(self.input_shape)

    def to_json_dict(self):
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config):
    """Raises ValueError naming the first bad setting of `config`."""
    def bad(name, expected):
        raise ValueError(f"--{name} must be {expected}, got {getattr(config, name)!r}")

    if config.dataset not in cifar_input.DATASETS:
        bad("dataset", f"one of {sorted(cifar_input.DATASETS)}")
    try:
        resnet_v2.resnet_v2_block_config(config.depth)
    except ValueError as e:
        raise ValueError(f"--depth: {e}") from None
    for name in ("epochs", "batch_size", "clip_every", "validation_freq", "shuffle_buffer"):
        if not _is_int(getattr(config, name)) or getattr(config, name) < 1:
            bad(name, "a positive integer")
    for name in ("spectra_every_n_epochs", "checkpoints_to_keep", "bn_recalibration_batches"):
        if not _is_int(getattr(config, name)) or getattr(config, name) < 0:
            bad(name, "an integer >= 0")
    if config.max_steps is not None and (not _is_int(config.max_steps) or config.max_steps < 1):
        bad("max_steps", "a positive integer (or unset)")
    if not _is_number(config.learning_rate) or not 0 < config.learning_rate < math.inf:
        bad("learning_rate", "a finite number > 0")
    bounds = config.lr_boundaries
    if (not isinstance(bounds, tuple) or not all(_is_number(b) and 0 < b < math.inf for b in bounds)
            or any(a >= b for a, b in zip(bounds, bounds[1:]))):
        bad("lr_boundaries", "strictly increasing epochs > 0")
    if not _is_number(config.lr_decay) or not 0 < config.lr_decay <= 1:
        bad("lr_decay", "in (0, 1]")
    if not _is_number(config.weight_decay) or not 0 <= config.weight_decay < math.inf:
        bad("weight_decay", "a finite number >= 0")
    if not _is_number(config.momentum) or not 0 <= config.momentum < 1:
        bad("momentum", "in [0, 1)")
    if config.clip_to is not None and (
            not _is_number(config.clip_to) or not 0 < config.clip_to < math.inf):
        bad("clip_to", "a finite number > 0 (or unset for the baseline)")
    for name in ("clip_method", "final_clip_method"):
        if getattr(config, name) not in tfcn_spectral.METHODS:
            bad(name, f"one of {tfcn_spectral.METHODS}")
    if config.clip_boundary not in tfcn_geometry.BOUNDARIES:
        bad("clip_boundary", f"one of {tfcn_geometry.BOUNDARIES}")
    if config.strategy not in STRATEGIES:
        bad("strategy", f"one of {STRATEGIES}")
    if config.progress not in PROGRESS:
        bad("progress", f"one of {tuple(PROGRESS)}")
    if not _is_int(config.num_classes) or config.num_classes < 1:
        bad("num_classes", "a positive integer")
    if (not isinstance(config.input_shape, tuple) or len(config.input_shape) != 3
            or not all(_is_int(d) and d > 0 for d in config.input_shape)):
        bad("input_shape", "(height, width, channels)")
    info = cifar_input.DATASETS[config.dataset]
    if config.batch_size > info.num_train:
        bad("batch_size", f"at most the {info.num_train} training images of {config.dataset}")


def _read_json(path):
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def _write_json_atomic(path, value):
    """Writes JSON to a temporary name, then renames: readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")
    tf.io.gfile.rename(tmp, path, overwrite=True)


def check_model_dir(config, model_dir):
    """Raises ValueError if `model_dir` cannot hold (or resume) this run.

    A model_dir that is a file, or one holding a run with different settings
    (other than those in `_RESUMABLE_CHANGES`), is refused.
    """
    if not model_dir:
        raise ValueError(f"--model_dir must be a directory path, got {model_dir!r}")
    if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
        raise ValueError(f"--model_dir must be a directory, but {model_dir!r} is a file")
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return
    try:
        saved = _read_json(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"--model_dir={model_dir!r} holds an unreadable {CONFIG_FILE}: {e}")
    current = config.to_json_dict()
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in _RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differing)
        raise ValueError(f"--model_dir={model_dir!r} holds a run with other settings ({detail}); "
                         f"use a new --model_dir to start a different run")


def make_strategy(name, tpu=None):
    """The tf.distribute strategy called `name` (see STRATEGIES)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def _worker_id(strategy):
    """(is_chief, suffix): only the chief writes to model_dir; others write to temp dirs."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or task_type is None:
        return True, ""
    cluster = resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0
                                        and "chief" not in cluster)
    return is_chief, "" if is_chief else f"{task_type}_{task_id}"


def learning_rate_schedule(config, steps_per_epoch):
    """Piecewise-constant learning rate, boundaries in epochs converted to steps."""
    boundaries = [int(round(b * steps_per_epoch)) for b in config.lr_boundaries]
    values = [config.learning_rate * config.lr_decay ** i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def _optimizer_steps(model):
    # keras.ops, not int(): under a strategy `iterations` is a distributed variable.
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class _FailOnNaN(keras.callbacks.Callback):
    """Stops at the first non-finite loss, before anything saves the broken weights.

    Placed first, it raises before the clipper (which refuses NaN kernels), the
    backup and the checkpoints see the step, so the last good epoch stays there.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"training diverged: loss {float(loss)} at step {_optimizer_steps(self.model)}; "
                f"lower --learning_rate or --clip_to, or resume from the last checkpoint")


class _StopAtStep(keras.callbacks.Callback):
    """Stops training once the optimizer has taken `max_steps` steps (all sessions)."""

    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if _optimizer_steps(self.model) >= self.max_steps:
            self.model.stop_training = True


def recalibrate_batch_norm(model, dataset, num_batches):
    """Re-estimates every BatchNormalization layer's moving statistics ("precise BN").

    The moving averages lag behind the weights: a projection changes the convs
    at once, and the mismatch compounds through the network's BN layers in
    inference mode. Training itself uses batch statistics, so this changes
    nothing but evaluation: each layer's moving mean and variance become the
    averages of its batch statistics over `num_batches` batches of `dataset`
    (Wu & Johnson 2021, "Rethinking Batch in BatchNorm", PreciseBN).

    Returns:
      The number of batches used (0 when the model has no BN layer).
    """
    layers = [l for l in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
              if isinstance(l, keras.layers.BatchNormalization)]
    if not layers or num_batches < 1:
        return 0
    momenta = [l.momentum for l in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # each call leaves exactly that batch's statistics

        @tf.function
        def batch_statistics(images):
            model(images, training=True)
            return [(l.moving_mean.value, l.moving_variance.value) for l in layers]

        sums, count = None, 0
        for images, _ in dataset.repeat().take(num_batches):
            stats = [(m.numpy().astype(np.float64), v.numpy().astype(np.float64))
                     for m, v in batch_statistics(images)]
            sums = stats if sums is None else [
                (sm + m, sv + v) for (sm, sv), (m, v) in zip(sums, stats)]
            count += 1
        for layer, (mean_sum, var_sum) in zip(layers, sums):
            layer.moving_mean.assign(mean_sum / count)
            layer.moving_variance.assign(var_sum / count)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return count


class _FinishTraining(keras.callbacks.Callback):
    """Ends the last epoch on a projection, then re-estimates the BN statistics.

    It sits before BackupAndRestore and the checkpoint callback, so the last
    checkpoint, the backup and model.keras all hold the projected kernels and
    matching BN statistics.
    """

    def __init__(self, last_epoch, projector=None, bn_dataset=None, bn_batches=0):
        super().__init__()
        self.last_epoch = last_epoch
        self.projector = projector
        self.bn_dataset = bn_dataset
        self.bn_batches = bn_batches
        self.norms = None

    def on_train_begin(self, logs=None):
        if self.projector is not None:
            self.projector.set_model(self.model)

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.last_epoch or self.model.stop_training:
            if self.projector is not None:
                self.norms = self.projector.project_now()
            if self.bn_batches:
                used = recalibrate_batch_norm(self.model, self.bn_dataset, self.bn_batches)
                logging.info("Re-estimated BatchNormalization statistics on %d batches.", used)


class _EpochCheckpoint(keras.callbacks.Callback):
    """Writes tf.train.Checkpoint(model=model) after every epoch, numbered by epoch."""

    def __init__(self, manager):
        super().__init__()
        self.manager = manager

    def on_epoch_end(self, epoch, logs=None):
        path = self.manager.save(checkpoint_number=epoch + 1)
        logging.info("Saved checkpoint %s", path)


class _SessionRecorder(keras.callbacks.Callback):
    """Remembers the first epoch run in this session and the last epoch's logs."""

    def __init__(self):
        super().__init__()
        self.first_epoch = None
        self.last_epoch = None
        self.last_logs = {}

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch = epoch
        self.last_logs = {k: float(v) for k, v in (logs or {}).items()}


def operator_norms(model):
    """{kernel path: (kind, lower, upper)}: a certified interval for the norm of
    every operator layer as the model computes it (its own zero padding)."""
    operators = tfcn_geometry.model_geometry(model)
    kernels = [op.to_spectral(tf.convert_to_tensor(op.variable.value)) for op in operators]
    bounds = tfcn_spectral.conv_operator_norm_bounds_many(
        kernels, [op.geometry for op in operators])
    return {op.name: (op.geometry.kind, float(b.lower), float(b.upper))
            for op, b in zip(operators, bounds)}


def build_model(config):
    """The compiled-ready (uncompiled) model a config describes; analysis rebuilds it so."""
    return resnet_v2.cifar_resnet_v2(
        config.depth, num_classes=config.num_classes, input_shape=config.input_shape,
        weight_decay=config.weight_decay)


def train_and_evaluate(config, model_dir):
    """Trains and evaluates as `config` says, writing everything under `model_dir`.

    Resumes from `model_dir/backup` when a previous run there was interrupted;
    returns the stored results when that run had already finished.

    Returns:
      The results dict also written to `model_dir/results.json`.

    Raises:
      ValueError: a bad config or model_dir (checked before any work).
      models.cifar_input.DataUnavailableError: the dataset cannot be found.
    """
    validate_config(config)
    check_model_dir(config, model_dir)
    results_path = os.path.join(model_dir, RESULTS_FILE)
    if tf.io.gfile.exists(results_path):
        logging.info("%s already holds a finished run; returning its results.", model_dir)
        return _read_json(results_path)

    start = time.time()
    strategy = make_strategy(config.strategy, config.tpu)
    is_chief, worker_suffix = _worker_id(strategy)
    # Non-chief workers write to a throw-away directory (the Model Garden way).
    write_dir = model_dir if is_chief else tempfile.mkdtemp(prefix=f"train_{worker_suffix}_")
    tf.io.gfile.makedirs(write_dir)
    if is_chief:
        _write_json_atomic(os.path.join(model_dir, CONFIG_FILE), config.to_json_dict())
    keras.utils.set_random_seed(config.seed)

    train_data, num_train = cifar_input.build_dataset(
        config.dataset, "train", config.batch_size, data_dir=config.data_dir,
        manual_dir=config.manual_dir, download=config.download,
        shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    test_data, num_test = cifar_input.build_dataset(
        config.dataset, "test", config.batch_size, data_dir=config.data_dir,
        manual_dir=config.manual_dir, download=config.download)
    steps_per_epoch = num_train // config.batch_size
    epochs = config.epochs
    if config.max_steps is not None:
        epochs = min(epochs, math.ceil(config.max_steps / steps_per_epoch))

    previous_policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy(
            "mixed_bfloat16" if config.strategy == "tpu" else "mixed_float16")
    try:
        with strategy.scope():
            model = build_model(config)
            optimizer = keras.optimizers.SGD(
                learning_rate_schedule(config, steps_per_epoch), momentum=config.momentum)
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])

        callbacks = [_FailOnNaN()]
        final = None
        if config.max_steps is not None:
            callbacks.append(_StopAtStep(config.max_steps))
        if config.clip_to is not None:
            # Conv kernels only, as in the paper: the dense classifier is left free.
            clipper = tfcn_callbacks.OperatorNormClipper(
                config.clip_to, every_n_steps=config.clip_every, method=config.clip_method,
                kinds=tfcn_geometry.CONV_KINDS, boundary=config.clip_boundary)
            final = clipper
            if (config.final_clip_method != config.clip_method
                    or config.clip_boundary != tfcn_geometry.BOUNDARY_LAYER):
                final = tfcn_callbacks.OperatorNormClipper(
                    config.clip_to, method=config.final_clip_method,
                    kinds=tfcn_geometry.CONV_KINDS)
            callbacks.append(clipper)
        finish = _FinishTraining(epochs - 1, final, train_data, config.bn_recalibration_batches)
        callbacks.append(finish)
        log_dir = os.path.join(write_dir, LOG_DIR)
        if config.spectra_every_n_epochs:
            callbacks.append(tfcn_callbacks.SpectrumLogger(
                log_dir, every_n_epochs=config.spectra_every_n_epochs))
        backup_dir = os.path.join(
            model_dir, BACKUP_DIR + (f"_{worker_suffix}" if worker_suffix else ""))
        callbacks.append(keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True))
        manager = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=model), os.path.join(write_dir, CHECKPOINT_DIR),
            max_to_keep=config.checkpoints_to_keep or None)
        recorder = _SessionRecorder()
        callbacks += [_EpochCheckpoint(manager), recorder,
                      keras.callbacks.TensorBoard(log_dir, update_freq="epoch", profile_batch=0)]

        model.fit(train_data, epochs=epochs, validation_data=test_data, shuffle=False,
                  validation_freq=config.validation_freq, callbacks=callbacks,
                  verbose=PROGRESS[config.progress])
        test_metrics = model.evaluate(test_data, return_dict=True, verbose=0)
        norms = operator_norms(model)
        certificate = tfcn_lipschitz.lipschitz_bound(model)

        model_path = os.path.join(write_dir, MODEL_FILE)
        tmp_model_path = os.path.join(write_dir, f".tmp-{os.getpid()}-{MODEL_FILE}")
        model.save(tmp_model_path)
        tf.io.gfile.rename(tmp_model_path, model_path, overwrite=True)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    conv_norms = [upper for kind, _, upper in norms.values() if kind in tfcn_geometry.CONV_KINDS]
    final_projection = None
    if finish.norms:
        before, after = zip(*finish.norms.values())
        final_projection = {"method": config.final_clip_method, "max_norm_before": max(before),
                            "max_norm_after": max(after)}
    results = {
        "test_accuracy": float(test_metrics["accuracy"]),
        "test_error": 1.0 - float(test_metrics["accuracy"]),
        "test_loss": float(test_metrics["loss"]),
        "train_accuracy": recorder.last_logs.get("accuracy"),
        "train_loss": recorder.last_logs.get("loss"),
        # Measured by Keras before the final projection (None if not evaluated).
        "last_epoch_val_accuracy": recorder.last_logs.get("val_accuracy"),
        "steps": _optimizer_steps(model),
        "epochs_completed": epochs,
        "resumed_from_epoch": recorder.first_epoch if recorder.first_epoch is not None else epochs,
        "num_train_examples": num_train,
        "num_test_examples": num_test,
        "num_params": int(model.count_params()),
        "clip_to": config.clip_to,
        # Certified: lower <= each layer's norm (with its zero padding) <= upper.
        "operator_norms": {name: upper for name, (_, _, upper) in norms.items()},
        "operator_norm_lower_bounds": {name: lower for name, (_, lower, _) in norms.items()},
        "operator_kinds": {name: kind for name, (kind, _, _) in norms.items()},
        "max_conv_operator_norm": max(conv_norms) if conv_norms else None,
        "max_conv_norm_over_bound": (max(conv_norms) / config.clip_to
                                     if config.clip_to and conv_norms else None),
        # The projection that ended training: largest conv norm before and after it.
        "final_projection": final_projection,
        # Certified: the trained model (inference mode) is this Lipschitz in l2.
        "lipschitz_upper_bound": float(certificate),
        "lipschitz_top_contributors": {f.name: f.factor
                                       for f in certificate.top_contributors(5)},
        "wall_time_s": time.time() - start,
        "model_path": model_path,
        "latest_checkpoint": manager.latest_checkpoint,
        "flags": config.to_json_dict(),
    }
    if is_chief:
        _write_json_atomic(results_path, results)
    else:
        tf.io.gfile.rmtree(write_dir)
    return results


# ----------------------------------------------------------------------------
# The binary: flags -> TrainConfig -> train_and_evaluate.

def define_flags(flag_values=flags.FLAGS):
    """Defines the binary's flags on `flag_values`.

    Called only when run as a binary (or by tests on their own FlagValues), so
    importing this module beside analyze.py defines no clashing flags.
    """
    d = TrainConfig()
    fv = flag_values
    flags.DEFINE_string("dataset", d.dataset, f"One of {sorted(cifar_input.DATASETS)}.",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data directory (default ~/tensorflow_datasets).",
                        flag_values=fv)
    flags.DEFINE_string("manual_dir", None, "Folder holding the raw download (e.g. "
                        "cifar-10-binary.tar.gz), to prepare the dataset offline.", flag_values=fv)
    flags.DEFINE_boolean("download", d.download, "Let TFDS download a dataset that is not "
                         "prepared.", flag_values=fv)
    flags.DEFINE_integer("depth", d.depth, "ResNet V2 depth: 6n+2 (basic blocks) or 9n+2 "
                         "(bottleneck blocks).", flag_values=fv)
    flags.DEFINE_integer("epochs", d.epochs, "Training epochs.", flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", None, "Initial learning rate (default 0.1 * batch_size "
                       "/ 128).", flag_values=fv)
    flags.DEFINE_list("lr_boundaries", None, "Epochs at which the learning rate is multiplied by "
                      "--lr_decay (default 91,136,182 for 182 epochs, scaled in proportion to "
                      "--epochs).", flag_values=fv)
    flags.DEFINE_float("lr_decay", d.lr_decay, "Learning-rate factor at each boundary.",
                       flag_values=fv)
    flags.DEFINE_float("weight_decay", d.weight_decay, "L2 weight decay in the tf.nn.l2_loss "
                       "sense: loss += weight_decay * sum(w^2) / 2.", flag_values=fv)
    flags.DEFINE_float("momentum", d.momentum, "SGD momentum.", flag_values=fv)
    flags.DEFINE_float("clip_to", None, "Operator-norm bound for every conv; unset trains the "
                       "baseline.", flag_values=fv)
    flags.DEFINE_integer("clip_every", d.clip_every, "Steps between projections.",
                         flag_values=fv)
    flags.DEFINE_string("clip_method", d.clip_method, f"Projection method, one of "
                        f"{tfcn_spectral.METHODS}.", flag_values=fv)
    flags.DEFINE_string("clip_boundary", d.clip_boundary, "Operator the periodic projections "
                        "act on: 'layer' (each conv's own zero padding, so the bound holds for "
                        "the real layer) or 'circular' (the published experiment's operator). "
                        "The final projection always uses 'layer'.", flag_values=fv)
    flags.DEFINE_string("final_clip_method", d.final_clip_method, "Method of the projection "
                        "that ends training: 'alternating' guarantees the bound, 'paper' is the "
                        "published protocol throughout.", flag_values=fv)
    flags.DEFINE_integer("spectra_every_n_epochs", d.spectra_every_n_epochs, "Log every "
                         "layer's spectrum to TensorBoard every N epochs (0: never).",
                         flag_values=fv)
    flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, model and results go.",
                        flag_values=fv)
    flags.DEFINE_string("strategy", d.strategy, f"tf.distribute strategy, one of {STRATEGIES}.",
                        flag_values=fv)
    flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.", flag_values=fv)
    flags.DEFINE_boolean("mixed_precision", d.mixed_precision, "Compute in float16 (bfloat16 "
                         "on TPU), keep the weights in float32.", flag_values=fv)
    flags.DEFINE_integer("seed", d.seed, "Random seed.", flag_values=fv)
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps in total (smoke runs).",
                         flag_values=fv)
    flags.DEFINE_integer("checkpoints_to_keep", d.checkpoints_to_keep, "Per-epoch checkpoints "
                         "kept (0: all).", flag_values=fv)
    flags.DEFINE_integer("validation_freq", d.validation_freq, "Evaluate on the test split "
                         "every N epochs.", flag_values=fv)
    flags.DEFINE_integer("bn_recalibration_batches", d.bn_recalibration_batches, "Training "
                         "batches over which BatchNormalization statistics are re-estimated at "
                         "the end, after the final projection (0: keep the running averages).",
                         flag_values=fv)
    flags.DEFINE_string("progress", d.progress, f"Keras progress output, one of "
                        f"{tuple(PROGRESS)}.", flag_values=fv)


def config_from_flags(flag_values=flags.FLAGS):
    """(TrainConfig, model_dir) from parsed flags, checked: app.UsageError when bad."""
    try:
        model_dir = flag_values.model_dir
        if not model_dir:
            raise ValueError("--model_dir is required")
        boundaries = flag_values.lr_boundaries
        if boundaries is not None:
            try:
                boundaries = tuple(float(b) for b in boundaries)
            except ValueError:
                raise ValueError(f"--lr_boundaries must be comma-separated epochs, got "
                                 f"{','.join(boundaries)!r}") from None
        names = {f.name for f in dataclasses.fields(TrainConfig)} - {
            "lr_boundaries", "num_classes", "input_shape", "shuffle_buffer"}
        config = TrainConfig(lr_boundaries=boundaries,
                             **{name: flag_values[name].value for name in names})
        validate_config(config)
        check_model_dir(config, model_dir)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    return config, model_dir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config, model_dir = config_from_flags(flags.FLAGS)
    results = train_and_evaluate(config, model_dir)
    bound = f" (bound {config.clip_to:g})" if config.clip_to else ""
    print(f"test accuracy {results['test_accuracy']:.4f} (error {results['test_error']:.4f}); "
          f"largest conv operator norm {results['max_conv_operator_norm']:.5g}{bound}; "
          f"{results['wall_time_s']:.0f} s")
    print(f"results:     {os.path.join(model_dir, RESULTS_FILE)}")
    print(f"model:       {results['model_path']}")
    print(f"checkpoints: {os.path.join(model_dir, CHECKPOINT_DIR)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(model_dir, LOG_DIR)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
