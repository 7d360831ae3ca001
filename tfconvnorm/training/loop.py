"""Training a CIFAR ResNet V2 with operator-norm projections: `train_and_evaluate`.

Reproduces the experiment of Sedghi, Gupta, Long (ICLR 2019): a pre-activation
ResNet trained on CIFAR-10 with the TF Model Garden recipe, with and without
clipping the singular values of every convolution every 100 steps. With
`clip_to`, every conv kernel is projected every `clip_every` steps with
`clip_method` ("paper": the published single clip), and the last epoch ends
on a projection with `final_clip_method` ("alternating" by default, which
guarantees that every real, zero-padded conv's norm is <= clip_to * (1 +
1e-4)). Then BatchNormalization statistics are re-estimated on training
batches, since the running averages lag behind the projections (baseline runs
too). Killed and restarted with the same `model_dir`, a run resumes from the
last completed epoch. The command line is `tfconvnorm.cli.train`.
"""

import math
import os
import re
import tempfile
import time

from absl import logging
import keras
import tensorflow as tf

from tfconvnorm import _compat
from tfconvnorm import callbacks as tfcn_callbacks
from tfconvnorm import files
from tfconvnorm import geometry as tfcn_geometry
from tfconvnorm import layer_norms
from tfconvnorm import lipschitz as tfcn_lipschitz
from tfconvnorm.batch_norm import PreciseBatchNorm, recalibrate_batch_norm
from tfconvnorm.callbacks import optimizer_step
from tfconvnorm.models import cifar_input
from tfconvnorm.models import lipschitz_nets
from tfconvnorm.models import resnet_v2
from tfconvnorm import robustness
from tfconvnorm.training.config import (BACKUP_DIR, CHECKPOINT_DIR, CONFIG_FILE, HISTORY_FILE,
                                        LOG_DIR, MODEL_FILE, PROGRESS, RESULTS_FILE, STRATEGIES,
                                        check_model_dir, validate_config)

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


class _FailOnNaN(keras.callbacks.Callback):
    """Stops at the first non-finite loss, before anything saves the broken weights.

    Placed first, it raises before the clipper (which refuses NaN kernels), the
    backup and the checkpoints see the step, so the last good epoch stays there.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"training diverged: loss {float(loss)} at step {optimizer_step(self.model)}; "
                f"lower --learning_rate or --clip_to, or resume from the last checkpoint")


class _StopAtStep(keras.callbacks.Callback):
    """Stops training once the optimizer has taken `max_steps` steps (all sessions)."""

    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps

    def on_train_batch_end(self, batch, logs=None):
        if optimizer_step(self.model) >= self.max_steps:
            self.model.stop_training = True


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


class _EpochWeights(keras.callbacks.Callback):
    """Under Keras' JAX and PyTorch backends (whose variables tf.train.Checkpoint
    cannot track): `model.save_weights` to `directory/ckpt-<epoch>.weights.h5`
    after every epoch, the latest `keep` kept (0: all). Written to a temporary
    name and renamed, so no half-written file carries a checkpoint's name."""

    PATTERN = re.compile(r"^ckpt-(\d+)\.weights\.h5$")

    def __init__(self, directory, keep):
        super().__init__()
        self.directory = directory
        self.keep = keep
        tf.io.gfile.makedirs(directory)

    def _saved(self):
        found = [(int(m.group(1)), name) for name in tf.io.gfile.listdir(self.directory)
                 for m in [self.PATTERN.match(name)] if m]
        return [os.path.join(self.directory, name) for _, name in sorted(found)]

    @property
    def latest_checkpoint(self):
        saved = self._saved()
        return saved[-1] if saved else None

    def on_epoch_end(self, epoch, logs=None):
        path = os.path.join(self.directory, f"ckpt-{epoch + 1}.weights.h5")
        tmp = os.path.join(self.directory, f".tmp-{os.getpid()}.weights.h5")
        self.model.save_weights(tmp)
        tf.io.gfile.rename(tmp, path, overwrite=True)
        logging.info("Saved checkpoint %s", path)
        if self.keep:
            for old in self._saved()[:-self.keep]:
                tf.io.gfile.remove(old)


class _CertifiedAccuracy(keras.callbacks.Callback):
    """Adds the certified Lipschitz bound and the certified accuracy on `data` at
    each radius to every epoch's logs (so history.json and TensorBoard get
    them): `lipschitz_upper_bound`, `certified_accuracy_<eps>`."""

    def __init__(self, data, eps):
        super().__init__()
        self.data = data
        self.eps = list(eps)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        bound = float(tfcn_lipschitz.lipschitz_bound(self.model))
        accuracy = robustness.certified_accuracy(self.model, self.data, self.eps,
                                                 lipschitz=bound)
        logs["lipschitz_upper_bound"] = bound
        for eps, value in accuracy.items():
            logs[f"certified_accuracy_{eps:g}"] = value


class _SessionRecorder(keras.callbacks.Callback):
    """Remembers the first epoch run in this session and the last epoch's logs, and
    keeps `history.json`: every epoch's logs and training time, across resumptions.

    Training time runs from an epoch's start to its validation (projections
    included, evaluation not), summed over epochs, so that curves against time
    (the paper's Fig. 4) do not charge the clipped run for being evaluated.
    """

    def __init__(self, path=None):
        super().__init__()
        self.path = path
        self.first_epoch = None
        self.last_epoch = None
        self.last_logs = {}
        self.history = []
        self._epoch_start = None
        self._train_time = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch
            if self.path and tf.io.gfile.exists(self.path):
                # A resumed run: keep the epochs the restored state had finished.
                self.history = [h for h in files.read_json(self.path)["epochs"]
                                if h["epoch"] <= epoch]
        self._epoch_start = time.time()
        self._train_time = None

    def on_test_begin(self, logs=None):
        if self._epoch_start is not None and self._train_time is None:
            self._train_time = time.time() - self._epoch_start

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch = epoch
        self.last_logs = {k: float(v) for k, v in (logs or {}).items()}
        train_time = (self._train_time if self._train_time is not None
                      else time.time() - self._epoch_start)
        total = (self.history[-1]["train_time_s"] if self.history else 0.0) + train_time
        self.history.append(dict(epoch=epoch + 1, step=optimizer_step(self.model),
                                 train_time_s=total, **self.last_logs))
        if self.path:
            files.write_json(self.path, {"epochs": self.history})


def operator_norms(model):
    """{kernel path: (kind, lower, upper)}: a certified interval for the norm of
    every operator layer as the model computes it (its own zero padding)."""
    operators = tfcn_geometry.model_geometry(model)
    return {op.name: (op.geometry.kind, lower, upper)
            for op, (lower, upper) in zip(operators, layer_norms.norm_intervals(operators))}


def _build_before_fit(model, dataset):
    """Builds the compiled model's state from one (undistributed) batch, so that
    `fit` need not.

    Keras 3's `fit` under a strategy first reduces a distributed batch with
    `strategy.reduce("MEAN", batch)` to build it symbolically; a batch is a
    structure (images, labels), which MultiWorkerMirroredStrategy's collective
    reduce cannot take (`ValueError: Attempt to convert a value (PerReplica...)`
    on every worker). Built here instead, that step is skipped.
    """
    _compat.symbolic_build(model, next(iter(dataset)))
    model.optimizer.build(model.trainable_variables)
    # Keras then averages each step's logs over the workers with
    # strategy.reduce("MEAN", value, axis=0), which refuses scalars ("Invalid
    # reduction dimension 0", tensorflow/tensorflow#72388): give it one-entry
    # vectors, whose mean over axis 0 across replicas is the scalar wanted.
    for name in ("train_step", "test_step"):
        step = getattr(model, name)
        setattr(model, name, lambda data, step=step: tf.nest.map_structure(
            lambda value: tf.reshape(value, [1]), step(data)))


def build_model(config):
    """The compiled-ready (uncompiled) model a config describes; analysis rebuilds it so."""
    if config.lipschitz is not None:
        return lipschitz_nets.lipschitz_resnet(
            config.input_shape, config.num_classes, config.depth, lipschitz=config.lipschitz,
            activation=config.lipschitz_activation)
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
        return files.read_json(results_path)

    start = time.time()
    strategy = make_strategy(config.strategy, config.tpu)
    is_chief, worker_suffix = _worker_id(strategy)
    # Non-chief workers write to a throw-away directory (the Model Garden way).
    write_dir = model_dir if is_chief else tempfile.mkdtemp(prefix=f"train_{worker_suffix}_")
    tf.io.gfile.makedirs(write_dir)
    if is_chief:
        files.write_json(os.path.join(model_dir, CONFIG_FILE), config.to_json_dict())
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    # The Lipschitz mode certifies radii in pixel space: pixels in [0, 1], not
    # per-image standardisation (data-dependent, and no fixed Lipschitz map).
    normalize = "unit" if config.lipschitz is not None else "standardize"
    train_data, num_train = cifar_input.build_dataset(
        config.dataset, "train", config.batch_size, data_dir=config.data_dir,
        manual_dir=config.manual_dir, download=config.download,
        shuffle_buffer=config.shuffle_buffer, seed=config.seed,
        num_examples=config.train_examples, normalize=normalize)
    test_data, num_test = cifar_input.build_dataset(
        config.dataset, "test", config.batch_size, data_dir=config.data_dir,
        manual_dir=config.manual_dir, download=config.download, normalize=normalize)
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
            if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
                _build_before_fit(model, train_data)

        callbacks = [_FailOnNaN()]
        final = None
        if config.max_steps is not None:
            callbacks.append(_StopAtStep(config.max_steps))
        if config.clip_to is not None:
            # Conv kernels only, as in the paper: the dense classifier is left free.
            clipper = tfcn_callbacks.OperatorNormClipper(
                config.clip_to, every_n_steps=config.clip_every, method=config.clip_method,
                kinds=tfcn_geometry.CONV_KINDS, boundary=config.clip_boundary,
                batch_norm_data=train_data if config.clip_bn_batches else None,
                batch_norm_batches=config.clip_bn_batches or 1)
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
        if config.certified_eps:
            # Before the recorder and TensorBoard, which read the logs it adds.
            callbacks.append(_CertifiedAccuracy(test_data, config.certified_eps))
        # Before BackupAndRestore: an epoch is in history.json before the backup
        # counts it as done, so a run killed between the two redoes the epoch
        # (its entry is replaced) instead of resuming past it with no entry.
        recorder = _SessionRecorder(os.path.join(write_dir, HISTORY_FILE))
        callbacks.append(recorder)
        backup_dir = os.path.join(
            model_dir, BACKUP_DIR + (f"_{worker_suffix}" if worker_suffix else ""))
        callbacks.append(_compat.backup_and_restore(backup_dir))
        if keras.backend.backend() == "tensorflow":
            manager = tf.train.CheckpointManager(
                tf.train.Checkpoint(model=model), os.path.join(write_dir, CHECKPOINT_DIR),
                max_to_keep=config.checkpoints_to_keep or None)
            callbacks.append(_EpochCheckpoint(manager))
        else:
            manager = _EpochWeights(os.path.join(write_dir, CHECKPOINT_DIR),
                                    config.checkpoints_to_keep)
            callbacks.append(manager)
        if config.validation_bn_batches:
            # After the recorder, whose clock stops when validation begins.
            callbacks.append(PreciseBatchNorm(train_data, config.validation_bn_batches))
        callbacks.append(
            keras.callbacks.TensorBoard(log_dir, update_freq="epoch", profile_batch=0))

        model.fit(train_data, epochs=epochs, validation_data=test_data, shuffle=False,
                  validation_freq=config.validation_freq, callbacks=callbacks,
                  verbose=PROGRESS[config.progress])
        test_metrics = model.evaluate(test_data, return_dict=True, verbose=0)
        norms = operator_norms(model)
        certificate = tfcn_lipschitz.lipschitz_bound(model)
        certified_accuracy = (robustness.certified_accuracy(
            model, test_data, list(config.certified_eps), lipschitz=float(certificate))
            if config.certified_eps else {})

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
        "steps": optimizer_step(model),
        "epochs_completed": epochs,
        "resumed_from_epoch": recorder.first_epoch if recorder.first_epoch is not None else epochs,
        "num_train_examples": num_train,
        "num_test_examples": num_test,
        "num_params": int(model.count_params()),
        "replicas": int(strategy.num_replicas_in_sync),
        "backend": keras.backend.backend(),
        # The convs' compute dtype (float16 under --mixed_precision; logits stay float32).
        "compute_dtype": next(l.dtype_policy.compute_dtype for l in model.layers
                              if isinstance(l, keras.layers.Conv2D)),
        "loss_scaling": isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
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
        # The Lipschitz mode's promise (None outside it): checked, not assumed.
        "lipschitz": config.lipschitz,
        # How inputs were scaled: the radii below are l2 distances in that space.
        "input_normalization": normalize,
        "lipschitz_within_bound": (float(certificate) <= config.lipschitz
                                   if config.lipschitz is not None else None),
        # Test examples classified correctly with certified l2 radius >= eps.
        "certified_accuracy": {f"{eps:g}": value for eps, value in certified_accuracy.items()},
        "lipschitz_top_contributors": {f.name: f.factor
                                       for f in certificate.top_contributors(5)},
        "wall_time_s": time.time() - start,
        # Time in training epochs (validation excluded), summed over resumed runs.
        "train_time_s": recorder.history[-1]["train_time_s"] if recorder.history else None,
        "model_path": model_path,
        "latest_checkpoint": manager.latest_checkpoint,
        "flags": config.to_json_dict(),
    }
    if is_chief:
        files.write_json(results_path, results)
    else:
        tf.io.gfile.rmtree(write_dir)
    return results
