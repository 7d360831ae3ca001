"""Writing output files so that no reader ever sees half of one.

Every file the package writes (spectra, summaries, plots, configs and
results of training runs, benchmark results) goes through `atomic_write`:
local paths and the remote ones `tf.io.gfile` knows (gs://...) alike.
"""

import io
import json
import os
import uuid

import tensorflow as tf

#: The file a training run describes itself in (its TrainConfig), which the
#: checkpoint readers read to rebuild the architecture.
RUN_CONFIG_FILE = "config.json"


def atomic_write(path, write):
    """Calls `write(binary_file)` on a temporary file next to `path`, then renames it.

    Readers never see a half-written `path`; on error the temporary file is
    removed and `path` is left as it was. The file gets the mode a plain
    `open()` gives (the umask applies).
    """
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    # Into memory first: writers such as np.savez seek, which a remote file cannot.
    buffer = io.BytesIO()
    write(buffer)
    try:
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(buffer.getvalue())
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise


def write_json(path, value):
    """`value` as indented, sorted JSON (NaN allowed), written atomically."""
    text = json.dumps(value, indent=2, sort_keys=True, allow_nan=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path):
    with tf.io.gfile.GFile(os.fspath(path), "r") as f:
        return json.load(f)
