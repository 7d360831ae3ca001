"""`.keras` model files: the model itself, loaded in Keras' safe mode."""

import os
import zipfile

import keras

from tfconvnorm.checkpoints.records import (Checkpoint, CheckpointError, first_line,
                                            model_records)
from tfconvnorm.checkpoints.tf_checkpoint import ZIP_MAGIC, file_magic, require_exists

FORMAT = "keras"


def detect(path):
    """A file with a zip archive's magic bytes, or named `.keras`."""
    return os.path.isfile(path) and (file_magic(path).startswith(ZIP_MAGIC)
                                     or path.endswith(".keras"))


def read(path, family=None, depth=None, image_size=None):  # pylint: disable=unused-argument
    """The `Checkpoint` of a `.keras` file: the model in it is the architecture."""
    model = load_keras_model_file(path)
    return Checkpoint(path, FORMAT, model_records(model), "model from the .keras file", model)


def read_keras_model_file(path):
    """Reads a `.keras` model file, in Keras' safe mode (no code from the file runs).

    Custom layers or constraints must be registered (imported) before calling.

    Returns:
      A list of `LayerRecord`, one per linear-operator kernel of the model.

    Raises:
      FileNotFoundError: no file at `path`.
      CheckpointError: not a readable `.keras` file.
    """
    return model_records(load_keras_model_file(path))


def load_keras_model_file(path):
    """The model of a `.keras` file, loaded in Keras' safe mode (no code from the
    file runs); raises as `read_keras_model_file`."""
    # Registers tfconvnorm's serializable constraints / regularizers.
    from tfconvnorm import constraints  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

    path = os.fspath(path)
    require_exists(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a .keras file (not a zip archive; truncated?)")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # pylint: disable=broad-except
        raise CheckpointError(f"{path}: cannot load the Keras model: "
                              f"{first_line(error)}") from error
    return model
