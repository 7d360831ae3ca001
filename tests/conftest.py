"""Shared pytest setup: quiet TensorFlow logs before TF is imported anywhere,
and the tiny TFDS dataset writer that several test files use."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # pylint: disable=wrong-import-position

if os.environ.get("TFCONVNORM_MUTANT"):  # tests/mutation_check.py: a deliberately wrong library
    import mutants  # pylint: disable=wrong-import-position
    mutants.apply(os.environ["TFCONVNORM_MUTANT"])


def store_tiny_cifar10(data_dir, num_train=32, num_test=8, seed=0):
    """Writes a real-format TFDS cifar10 copy (same name, version and features)
    to data_dir, so tests go through the real loading code offline; returns
    the {split: (images, labels)} it wrote."""
    # Imported here: the pytest controller process need not load TensorFlow.
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    rng = np.random.RandomState(seed)
    arrays = {}

    def split(name, n):
        images = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        labels = rng.randint(0, 10, n).astype(np.int64)
        arrays[name] = (images, labels)
        return tf.data.Dataset.from_tensor_slices(
            {"id": [f"{name}_{i}" for i in range(n)], "image": images, "label": labels})

    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="cifar10", version="3.0.2", features=features, data_dir=str(data_dir),
        split_datasets={"train": split("train", num_train), "test": split("test", num_test)})
    return arrays


@pytest.fixture(scope="session")
def tiny_cifar10_writer():
    """`store_tiny_cifar10`, for tests and fixtures of any scope."""
    return store_tiny_cifar10


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's own id: each test's data is fixed
    and does not depend on which tests ran before it (or on xdist's scheduling)."""
    import zlib  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
