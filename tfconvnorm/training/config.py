"""The settings of a training run: `TrainConfig`, their checks, the run directory.

A run directory (`model_dir`) holds:

    config.json    the TrainConfig (dataset, depth, num_classes, input_shape, ...)
    checkpoints/   per-epoch tf.train.Checkpoint(model=model) files (CheckpointManager);
                   under Keras' JAX / PyTorch backends ckpt-<epoch>.weights.h5 files
    backup/        keras.callbacks.BackupAndRestore state: a killed run resumes here
    logs/          TensorBoard: train/, validation/ (Keras), spectra/ (SpectrumLogger)
    model.keras    the final model
    history.json   every epoch's logs (loss, accuracy, val_*), step and training time
    results.json   test accuracy/error, each layer's certified norm interval, the
                   model's certified Lipschitz bound, wall time, flags
"""

import dataclasses
import json
import math
import os

import keras
import tensorflow as tf

from tfconvnorm import files
from tfconvnorm import geometry as tfcn_geometry
from tfconvnorm import spectral as tfcn_spectral
from tfconvnorm.callbacks import DEFAULT_CLIPPER_METHOD, DEFAULT_EVERY_N_STEPS
from tfconvnorm.models import cifar_input
from tfconvnorm.models.lipschitz_nets import ACTIVATIONS
from tfconvnorm.models import resnet_v2

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")
PROGRESS = {"bar": 1, "epoch": 2, "none": 0}
# The Model Garden CIFAR recipe: lr 0.1 per 128 images, x0.1 at epochs 91, 136
# and 182 of 182. With another --epochs the boundaries keep these fractions.
BASE_LEARNING_RATE = 0.1
BASE_BATCH_SIZE = 128
RECIPE_EPOCHS = 182
RECIPE_BOUNDARIES = (91, 136, 182)
#: Radii of the certified accuracy in the Lipschitz mode (inputs in [0, 1]).
DEFAULT_CERTIFIED_EPS = (0.1, 0.25, 0.5)
CONFIG_FILE = files.RUN_CONFIG_FILE
RESULTS_FILE = "results.json"
HISTORY_FILE = "history.json"
MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoints"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
# Flags that may change when a run is resumed in the same model_dir: where the
# data lives, how the run is executed or reported, and how long it runs.
_RESUMABLE_CHANGES = frozenset({
    "data_dir", "manual_dir", "download", "strategy", "tpu", "progress", "max_steps",
    "epochs", "spectra_every_n_epochs", "checkpoints_to_keep", "validation_freq",
    "bn_recalibration_batches", "validation_bn_batches", "deterministic"})


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
    clip_every: int = DEFAULT_EVERY_N_STEPS
    clip_method: str = DEFAULT_CLIPPER_METHOD
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
    # Bit-identical reruns with the same seed: TF op determinism (process-wide,
    # somewhat slower). Without it, same-seed runs agree only to thread-order
    # rounding, which training amplifies.
    deterministic: bool = False
    max_steps: int = None          # stop after this many optimizer steps in total
    checkpoints_to_keep: int = 10  # 0: keep every epoch's checkpoint
    validation_freq: int = 1       # evaluate on the test split every N epochs
    shuffle_buffer: int = cifar_input.DEFAULT_SHUFFLE_BUFFER
    train_examples: int = None     # a reduced training set: the split's first N (None: all)
    # Batches of training data over which BN statistics are re-estimated at the
    # end (after the final projection); 0 keeps the running averages.
    bn_recalibration_batches: int = 100
    # Batches over which BN statistics are re-estimated after every projection
    # during training (0: none). Off by default: validation_bn_batches is what
    # makes per-epoch validation meaningful (BENCHMARKS.md, "Validation curves").
    clip_bn_batches: int = 0
    # Batches over which BN statistics are re-estimated before every per-epoch
    # validation (0: Keras' running averages, which lag behind the weights).
    validation_bn_batches: int = 10
    progress: str = "bar"          # Keras progress output: bar, epoch (a line each), none
    # The Lipschitz mode: a network with lipschitz_bound(model) <= lipschitz by
    # construction (models.lipschitz_resnet of this depth) instead of the ResNet V2.
    lipschitz: float = None
    lipschitz_activation: str = "maxmin"
    # l2 radii at which certified accuracy on the test split is logged every
    # epoch (history.json, TensorBoard) and recorded in results.json. None:
    # DEFAULT_CERTIFIED_EPS in the Lipschitz mode, none otherwise.
    certified_eps: tuple = None
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
        if self.certified_eps is None:
            self.certified_eps = DEFAULT_CERTIFIED_EPS if self.lipschitz is not None else ()
        elif isinstance(self.certified_eps, list):
            self.certified_eps = tuple(self.certified_eps)

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
    for name in ("spectra_every_n_epochs", "checkpoints_to_keep", "bn_recalibration_batches",
                 "clip_bn_batches", "validation_bn_batches"):
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
    backend = keras.backend.backend()
    if config.strategy != "default" and backend != "tensorflow":
        bad("strategy", f"'default' under Keras' {backend} backend (tf.distribute strategies "
                        "need KERAS_BACKEND=tensorflow)")
    if config.lipschitz is not None:
        if not _is_number(config.lipschitz) or not 0 < config.lipschitz < math.inf:
            bad("lipschitz", "a finite number > 0 (or unset)")
        if config.clip_to is not None:
            bad("lipschitz", "unset with --clip_to (the Lipschitz mode constrains every layer "
                             "itself)")
        if (config.depth - 2) % 6:
            bad("depth", "6n + 2 in the Lipschitz mode (basic blocks)")
    if config.lipschitz_activation not in ACTIVATIONS:
        bad("lipschitz_activation", f"one of {ACTIVATIONS}")
    if (not isinstance(config.certified_eps, tuple)
            or not all(_is_number(e) and 0 <= e < math.inf for e in config.certified_eps)):
        bad("certified_eps", "l2 radii >= 0")
    if config.progress not in PROGRESS:
        bad("progress", f"one of {tuple(PROGRESS)}")
    if not _is_int(config.num_classes) or config.num_classes < 1:
        bad("num_classes", "a positive integer")
    if (not isinstance(config.input_shape, tuple) or len(config.input_shape) != 3
            or not all(_is_int(d) and d > 0 for d in config.input_shape)):
        bad("input_shape", "(height, width, channels)")
    info = cifar_input.DATASETS[config.dataset]
    if config.train_examples is not None and (
            not _is_int(config.train_examples)
            or not config.batch_size <= config.train_examples <= info.num_train):
        bad("train_examples", f"an integer from --batch_size={config.batch_size} to the "
                              f"{info.num_train} training images of {config.dataset} (or unset)")
    if config.batch_size > info.num_train:
        bad("batch_size", f"at most the {info.num_train} training images of {config.dataset}")


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
        saved = files.read_json(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"--model_dir={model_dir!r} holds an unreadable {CONFIG_FILE}: {e}")
    current = config.to_json_dict()
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in _RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in differing)
        raise ValueError(f"--model_dir={model_dir!r} holds a run with other settings ({detail}); "
                         f"use a new --model_dir to start a different run")
