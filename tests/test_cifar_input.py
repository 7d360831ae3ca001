"""Tests for models/cifar_input.py: datasets, augmentation, TFDS loading and its errors."""

import numpy as np
import pytest
import tensorflow as tf

from tfconvnorm.models import cifar_input


def _arrays(dataset):
    images, labels = zip(*dataset.as_numpy_iterator())
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def digits():
    return {split: _arrays(cifar_input.load_split("digits", split)[0])
            for split in ("train", "test")}


def test_dataset_info_and_unknown_names():
    assert cifar_input.dataset_info("cifar10").num_classes == 10
    assert cifar_input.dataset_info("cifar100").num_classes == 100
    assert cifar_input.dataset_info("svhn_cropped").flip is False
    assert cifar_input.dataset_info("digits").image_shape == (32, 32, 1)
    with pytest.raises(ValueError, match="dataset must be one of .*'imagenet'"):
        cifar_input.dataset_info("imagenet")
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'validation'"):
        cifar_input.load_split("digits", "validation")


def test_digits_split_is_fixed_disjoint_and_labelled(digits):
    (x, y), (xt, yt) = digits["train"], digits["test"]
    assert x.shape == (1437, 32, 32, 1) and xt.shape == (360, 32, 32, 1)
    assert x.dtype == np.uint8 and y.dtype == np.int32
    assert set(y) == set(yt) == set(range(10))
    # Disjoint (the 1797 digits images are all distinct) and the same on every load.
    train_rows = {row.tobytes() for row in x}
    assert not train_rows & {row.tobytes() for row in xt}
    again, _ = _arrays(cifar_input.load_split("digits", "test")[0])
    np.testing.assert_array_equal(again, xt)
    # Images and labels line up: 1-nearest-neighbour on the upsampled pixels
    # classifies the test split almost perfectly (sklearn's digits: ~98%).
    a = x.reshape(len(x), -1).astype(np.float32)
    b = xt.reshape(len(xt), -1).astype(np.float32)
    distances = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None]
    assert np.mean(y[np.argmin(distances, axis=1)] == yt) > 0.95


def test_eval_preprocessing_standardizes():
    image = np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8)
    out = cifar_input.preprocess_image(image, False, (32, 32, 3), flip=True).numpy()
    assert out.dtype == np.float32
    assert abs(out.mean()) < 1e-4 and out.std() == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_allclose(
        out, tf.image.per_image_standardization(image.astype(np.float32)), rtol=1e-5)


def _window_offsets(out, image, flip):
    """Offsets (dy, dx, flipped) of the padded image's windows that `out` standardizes."""
    padded = np.pad(image.astype(np.float32), ((4, 4), (4, 4), (0, 0)))
    found = []
    for dy in range(9):
        for dx in range(9):
            window = padded[dy:dy + 32, dx:dx + 32]
            for flipped in ((False, True) if flip else (False,)):
                candidate = window[:, ::-1] if flipped else window
                expected = tf.image.per_image_standardization(candidate).numpy()
                if np.allclose(out, expected, atol=1e-4):
                    found.append((dy, dx, flipped))
    return found


@pytest.mark.parametrize("flip", [False, True])
def test_training_augmentation_is_pad_crop_flip(flip):
    tf.random.set_seed(3)
    image = np.random.RandomState(1).randint(1, 256, (32, 32, 1)).astype(np.uint8)
    seen = set()
    for _ in range(12):
        out = cifar_input.preprocess_image(image, True, (32, 32, 1), flip=flip).numpy()
        assert out.shape == (32, 32, 1)
        offsets = _window_offsets(out, image, flip)
        assert len(offsets) == 1, "every output is one window of the zero-padded image"
        seen.add(offsets[0])
    assert len({(dy, dx) for dy, dx, _ in seen}) > 3  # crops vary
    assert any(f for _, _, f in seen) == flip  # flips happen only when asked for


def test_build_dataset_digits_batches():
    train, num_train = cifar_input.build_dataset("digits", "train", 100, seed=0)
    assert num_train == 1437
    assert int(train.cardinality()) == 14  # the last partial batch is dropped
    images, labels = next(iter(train))
    assert images.shape == (100, 32, 32, 1) and images.dtype == tf.float32
    assert labels.shape == (100,) and labels.dtype == tf.int32
    first_epoch = np.concatenate([l.numpy() for _, l in train])
    second_epoch = np.concatenate([l.numpy() for _, l in train])
    assert not np.array_equal(first_epoch, second_epoch)  # reshuffled every epoch
    test, num_test = cifar_input.build_dataset("digits", "test", 100)
    test_labels = np.concatenate([l.numpy() for _, l in test])
    assert num_test == len(test_labels) == 360  # evaluation keeps every example
    with pytest.raises(ValueError, match="batch_size=2000 exceeds the 1437 examples"):
        cifar_input.build_dataset("digits", "train", 2000)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int; received batch_size=0"):
        cifar_input.build_dataset("digits", "train", 0)


def test_loads_a_tfds_copy_from_data_dir(tmp_path, tiny_cifar10_writer):
    arrays = tiny_cifar10_writer(tmp_path, num_train=32, num_test=8)
    dataset, n = cifar_input.load_split("cifar10", "train", data_dir=str(tmp_path),
                                        download=False)
    images, labels = _arrays(dataset)
    assert n == 32 and images.shape == (32, 32, 32, 3)
    # The stored examples, in some order.
    order = np.lexsort(images.reshape(32, -1).T)
    stored = arrays["train"][0]
    stored_order = np.lexsort(stored.reshape(32, -1).T)
    np.testing.assert_array_equal(images[order], stored[stored_order])
    np.testing.assert_array_equal(labels[order], arrays["train"][1][stored_order])
    train, _ = cifar_input.build_dataset("cifar10", "train", 8, data_dir=str(tmp_path))
    batches = list(train)
    assert len(batches) == 4 and batches[0][0].shape == (8, 32, 32, 3)


def test_reduced_split_is_the_same_first_examples_every_time(digits, tmp_path,
                                                            tiny_cifar10_writer):
    dataset, n = cifar_input.load_split("digits", "train", num_examples=300)
    images, labels = _arrays(dataset)
    assert n == 300 and images.shape == (300, 32, 32, 1)
    np.testing.assert_array_equal(images, digits["train"][0][:300])
    np.testing.assert_array_equal(labels, digits["train"][1][:300])
    assert set(labels) == set(range(10))  # every class is in the reduced set
    train, num_train = cifar_input.build_dataset("digits", "train", 32, seed=0, num_examples=300)
    assert num_train == 300 and int(train.cardinality()) == 9
    # A TFDS copy: files read in order, so two loads give the same examples.
    stored = tiny_cifar10_writer(tmp_path, num_train=32, num_test=8)["train"][0]
    first, second = (_arrays(cifar_input.load_split(
        "cifar10", "train", data_dir=str(tmp_path), download=False, num_examples=10)[0])[0]
        for _ in range(2))
    np.testing.assert_array_equal(first, second)
    assert first.shape[0] == 10
    assert {row.tobytes() for row in first} <= {row.tobytes() for row in stored}
    for bad, message in [(0, "num_examples must be None or an integer >= 1, got 0"),
                         (2.5, "got 2.5"), (True, "got True"),
                         (2000, "num_examples=2000 exceeds the 1437 examples of 'digits'")]:
        with pytest.raises(ValueError, match=message):
            cifar_input.load_split("digits", "train", num_examples=bad)
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 40 examples"):
        cifar_input.build_dataset("digits", "train", 64, num_examples=40)


def test_missing_data_says_how_to_provide_it(tmp_path, monkeypatch):
    empty = str(tmp_path / "tfds")
    with pytest.raises(cifar_input.DataUnavailableError) as info:
        cifar_input.load_split("cifar10", "train", data_dir=empty, download=False)
    message = str(info.value)
    for needed in ("--data_dir", "--manual_dir", "cifar-10-binary.tar.gz", "download_and_prepare",
                   "downloading is disabled"):
        assert needed in message
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(cifar_input.DataUnavailableError, match=r"lacks \['cifar-10-binary"):
        cifar_input.load_split("cifar10", "test", data_dir=empty, manual_dir=str(manual))
    # Offline: fail at once rather than after minutes of download retries.
    monkeypatch.setattr(cifar_input, "_server_reachable", lambda url: False)
    with pytest.raises(cifar_input.DataUnavailableError, match="(?s)cannot be reached.*--manual_dir"):
        cifar_input.load_split("svhn_cropped", "train", data_dir=empty)


def _cifar10_binary_tarball(path, rng, train_per_batch=4, test=6):
    """cifar-10-binary.tar.gz in the published layout (a label byte, then
    3x32x32 channel-major pixels, per record); returns {split: (images HWC, labels)}."""
    import io  # pylint: disable=import-outside-toplevel
    import tarfile  # pylint: disable=import-outside-toplevel
    written, members = {"train": ([], []), "test": ([], [])}, {}

    def records(split, n):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        written[split][0].append(pixels.transpose(0, 2, 3, 1))
        written[split][1].append(labels)
        return np.concatenate([labels[:, None], pixels.reshape(n, -1)], 1).tobytes()

    for i in range(1, 6):
        members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = records("train", train_per_batch)
    members["cifar-10-batches-bin/test_batch.bin"] = records("test", test)
    members["cifar-10-batches-bin/batches.meta.txt"] = "\n".join(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"]).encode() + b"\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {split: (np.concatenate(x), np.concatenate(y)) for split, (x, y) in written.items()}


def test_manual_dir_prepares_cifar10_from_the_raw_tarball(tmp_path, rng, monkeypatch):
    """--manual_dir holding cifar-10-binary.tar.gz: TFDS prepares it into
    --data_dir offline and every image and label read back is the one written.
    The tarball is a small stand-in, so TFDS's checksum of the real 162 MiB
    file is switched off here (only here)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    manager = tfds.download.DownloadManager
    monkeypatch.setattr(manager, "_register_or_validate_checksums",
                        lambda self, url, url_info, path: None)
    manual = tmp_path / "manual"
    manual.mkdir()
    written = _cifar10_binary_tarball(str(manual / "cifar-10-binary.tar.gz"), rng)
    data_dir = str(tmp_path / "tfds")
    for split in ("train", "test"):
        dataset, count = cifar_input.load_split("cifar10", split, data_dir=data_dir,
                                                manual_dir=str(manual), download=False)
        images, labels = written[split]
        assert count == len(labels) == {"train": 20, "test": 6}[split]
        got = sorted((int(label), image.tobytes()) for image, label in dataset.as_numpy_iterator())
        want = sorted((int(label), image.tobytes()) for image, label in zip(images, labels))
        assert got == want
    # Prepared once: readable afterwards without the manual files.
    (manual / "cifar-10-binary.tar.gz").unlink()
    _, count = cifar_input.load_split("cifar10", "train", data_dir=data_dir, download=False)
    assert count == 20
