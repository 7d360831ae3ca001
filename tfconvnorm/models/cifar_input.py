"""tf.data input pipelines for CIFAR-sized image classification.

Datasets (by name): TFDS `cifar10`, `cifar100` and `svhn_cropped`, plus
`digits`: scikit-learn's bundled 8x8 handwritten digits (1797 images, no
download), upsampled to 32x32 grey images with a fixed train/test split, for
the demo and for tests that need real images offline.

Training pipeline (the TF Model Garden CIFAR recipe): cache the decoded uint8
images, shuffle, pad to 40x40 and randomly crop 32x32, random horizontal flip
(CIFAR only: flipping digits and house numbers changes what they show),
per-image standardization, batch, prefetch. Evaluation: standardization only.

TensorFlow Datasets is imported only when a TFDS dataset is asked for.
"""

import dataclasses
import os
import socket
import urllib.parse

import numpy as np
import tensorflow as tf

from tfconvnorm.spectral.arguments import check_positive_int

# Pixels added on each side before the random crop (32 -> 40 -> 32).
CROP_PADDING = 4
# The Model Garden shuffles CIFAR with a buffer as large as the training set.
DEFAULT_SHUFFLE_BUFFER = 50_000
# Fixed split of scikit-learn's 1797 digits: this many test images, chosen by
# a permutation from NumPy's legacy RandomState (frozen across NumPy versions).
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
DIGITS_IMAGE_SIZE = 32
# How long to wait when probing whether a download server is reachable, so that
# an offline machine fails at once instead of after minutes of retries.
_PROBE_TIMEOUT_S = 5.0


class DataUnavailableError(RuntimeError):
    """A dataset is neither prepared locally nor obtainable; says how to provide it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline and the model need to know about a dataset.

    Attributes:
      name: the name accepted by `--dataset`.
      num_classes: number of labels.
      image_shape: (height, width, channels) of the images fed to the model.
      train_split, test_split: split names.
      flip: whether training augmentation flips images horizontally.
      num_train, num_test: split sizes.
      tfds_name: TFDS builder name, or None for in-memory datasets.
      manual_files: what `--manual_dir` must hold for TFDS to prepare it offline.
      download_url: where TFDS downloads it from (probed before downloading).
    """
    name: str
    num_classes: int
    image_shape: tuple
    train_split: str
    test_split: str
    flip: bool
    num_train: int
    num_test: int
    tfds_name: str = None
    manual_files: tuple = ()
    download_url: str = None


DATASETS = {
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3), "train", "test", True, 50_000, 10_000, "cifar10",
        ("cifar-10-binary.tar.gz",), "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"),
    "cifar100": DatasetInfo(
        "cifar100", 100, (32, 32, 3), "train", "test", True, 50_000, 10_000, "cifar100",
        ("cifar-100-binary.tar.gz",), "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"),
    "svhn_cropped": DatasetInfo(
        "svhn_cropped", 10, (32, 32, 3), "train", "test", False, 73_257, 26_032, "svhn_cropped",
        ("train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"),
        "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"),
    "digits": DatasetInfo(
        "digits", 10, (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE, 1), "train", "test", False,
        1797 - DIGITS_TEST_SIZE, DIGITS_TEST_SIZE),
}


def dataset_info(name):
    """Returns the `DatasetInfo` of `name`; ValueError naming the choices otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}") from None


def _how_to_provide(info, data_dir, manual_dir):
    files = ", ".join(info.manual_files)
    return (
        f"Provide it in one of two ways:\n"
        f"  --data_dir=DIR where DIR holds a prepared TFDS copy (DIR/{info.tfds_name}/<version>/), "
        f"made on a connected machine with\n"
        f"    python -c \"import tensorflow_datasets as tfds; "
        f"tfds.builder('{info.tfds_name}', data_dir='DIR').download_and_prepare()\"\n"
        f"  --manual_dir=DIR where DIR holds {files} (from "
        f"{info.download_url.rsplit('/', 1)[0]}/); TFDS prepares it from there into --data_dir.\n"
        f"(data_dir={data_dir!r}, manual_dir={manual_dir!r})")


def _server_reachable(url):
    """True when a TCP connection to the URL's host can be opened quickly."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _tfds_builder(info, data_dir, manual_dir, download):
    """Returns a prepared TFDS builder, preparing it if allowed and possible."""
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataUnavailableError(
            f"dataset {info.name!r} needs tensorflow-datasets: "
            f"pip install tensorflow-datasets importlib_resources") from e
    builder = tfds.builder(info.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    where = f"{info.name!r} is not prepared under {str(builder.data_path)!r}"
    if manual_dir is not None:
        missing = [f for f in info.manual_files
                   if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
        if missing:
            raise DataUnavailableError(
                f"{where}, and --manual_dir={manual_dir!r} lacks {missing}. "
                + _how_to_provide(info, data_dir, manual_dir))
    elif not download:
        raise DataUnavailableError(
            f"{where}, and downloading is disabled. " + _how_to_provide(info, data_dir, manual_dir))
    elif not _server_reachable(info.download_url):
        raise DataUnavailableError(
            f"{where}, and {info.download_url} cannot be reached (offline?). "
            + _how_to_provide(info, data_dir, manual_dir))
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=manual_dir is None and download))
    except Exception as e:  # pylint: disable=broad-except
        raise DataUnavailableError(
            f"{where}, and preparing it failed ({type(e).__name__}: {e}). "
            + _how_to_provide(info, data_dir, manual_dir)) from e
    return builder


def _digits_arrays(split):
    """The fixed digits split as (uint8 images (N, 32, 32, 1), int32 labels)."""
    from sklearn import datasets as sk_datasets  # pylint: disable=import-outside-toplevel
    digits = sk_datasets.load_digits()
    # Pixel values are 0..16; scale to 0..255 and upsample smoothly so that the
    # 3x3 convs and the 32x32 augmentation see CIFAR-sized images.
    images = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)
    images = tf.image.resize(images, (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), method="bilinear")
    images = np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int32)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    index = order[DIGITS_TEST_SIZE:] if split == "train" else order[:DIGITS_TEST_SIZE]
    index = np.sort(index)
    return images[index], labels[index]


def load_split(name, split, data_dir=None, manual_dir=None, download=True, num_examples=None):
    """Loads one split, undecorated: a dataset of (uint8 image HWC, int32 label).

    Args:
      name: a key of `DATASETS`.
      split: "train" or "test" (mapped to the dataset's own split names).
      data_dir: TFDS data directory (None: TFDS' default, ~/tensorflow_datasets).
      manual_dir: folder holding the raw download files (see `DatasetInfo`).
      download: whether TFDS may download when the data is not prepared.
      num_examples: None (the whole split) or a reduced split: its first
        `num_examples` examples in the stored order (files read in order), the
        same ones in every run.

    Returns:
      (dataset, number of examples).

    Raises:
      ValueError: unknown name or split.
      DataUnavailableError: the data is not there and cannot be obtained; the
        message says how to provide it (`--data_dir` or `--manual_dir`).
    """
    info = dataset_info(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if num_examples is not None and (isinstance(num_examples, bool)
                                     or not isinstance(num_examples, int) or num_examples < 1):
        raise ValueError(f"num_examples must be None or an integer >= 1, got {num_examples!r}")

    def reduced(dataset, available):
        if num_examples is None:
            return dataset, available
        if num_examples > available:
            raise ValueError(f"num_examples={num_examples} exceeds the {available} examples of "
                             f"{name!r} split {split!r}")
        return dataset.take(num_examples), num_examples

    if info.tfds_name is None:
        images, labels = _digits_arrays(split)
        return reduced(tf.data.Dataset.from_tensor_slices((images, labels)), len(labels))
    builder = _tfds_builder(info, data_dir, manual_dir, download)
    tfds_split = info.train_split if split == "train" else info.test_split
    available = builder.info.splits[tfds_split].num_examples
    # A reduced split must be the same examples every time: files in order.
    dataset = builder.as_dataset(split=tfds_split,
                                 shuffle_files=split == "train" and num_examples is None)
    dataset = dataset.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return reduced(dataset, available)


#: How pixels are scaled: "standardize" (the Model Garden's per-image zero mean,
#: unit variance) or "unit" (x / 255, in [0, 1]: a fixed linear map, so an l2
#: radius means the same for every image, as certified robustness needs).
NORMALIZATIONS = ("standardize", "unit")


def preprocess_image(image, is_training, image_shape, flip, normalize="standardize"):
    """Model Garden CIFAR preprocessing: (pad-4, random crop, flip) then standardize
    (or, with normalize="unit", scale to [0, 1]).

    Args:
      image: uint8 (or float) image of `image_shape`.
      is_training: whether to augment.
      image_shape: (height, width, channels) of the output.
      flip: whether to flip horizontally at random (training only).
      normalize: one of `NORMALIZATIONS`.

    Returns:
      float32 image of `image_shape`, zero mean and unit variance per image
      (or in [0, 1]).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"`normalize` must be one of {NORMALIZATIONS}; received "
                         f"normalize={normalize!r}.")
    height, width, channels = image_shape
    image = tf.cast(image, tf.float32)
    if is_training:
        image = tf.image.resize_with_crop_or_pad(
            image, height + 2 * CROP_PADDING, width + 2 * CROP_PADDING)
        image = tf.image.random_crop(image, [height, width, channels])
        if flip:
            image = tf.image.random_flip_left_right(image)
    if normalize == "unit":
        return image / 255.0
    return tf.image.per_image_standardization(image)


def build_dataset(name, split, batch_size, is_training=None, data_dir=None, manual_dir=None,
                  download=True, shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, seed=None,
                  cache=True, num_examples=None, normalize="standardize"):
    """Batched, preprocessed, prefetched pipeline for one split.

    Training (`is_training`, default: split == "train") shuffles every epoch,
    augments and drops the last partial batch (every step sees a full batch,
    as the learning-rate schedule assumes); evaluation keeps every example.
    The dataset is finite (one epoch); Keras iterates it once per epoch.
    `num_examples` reduces the split as in `load_split`; `normalize` is
    `preprocess_image`'s.

    Returns:
      (dataset of (float32 images (B, H, W, C), int32 labels (B,)), number of examples).

    Raises:
      ValueError: bad arguments, or a training split smaller than one batch.
      DataUnavailableError: see `load_split`.
    """
    info = dataset_info(name)
    batch_size = check_positive_int(batch_size, "batch_size")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"`normalize` must be one of {NORMALIZATIONS}; received "
                         f"normalize={normalize!r}.")
    if is_training is None:
        is_training = split == "train"
    dataset, num_examples = load_split(name, split, data_dir, manual_dir, download,
                                       num_examples)
    if is_training and num_examples < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} examples of "
                         f"{name!r} split {split!r}")
    if cache:
        dataset = dataset.cache()
    if is_training:
        dataset = dataset.shuffle(min(shuffle_buffer, num_examples), seed=seed,
                                  reshuffle_each_iteration=True)

    def preprocess(image, label):
        return preprocess_image(image, is_training, info.image_shape, info.flip,
                                normalize), label

    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=is_training)
    options = tf.data.Options()
    # Shard by example under multi-worker strategies: cached/in-memory sources
    # have no files to shard by.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    dataset = dataset.with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE), num_examples
