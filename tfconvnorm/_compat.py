"""The supported TensorFlow and Keras versions, and every use of their internals.

Nothing else in the package touches a private Keras or TensorFlow name: each
helper below takes a public API where one exists and the private path only
where none does (or as the fallback of an older release), with the versions
it was checked on. A Keras release that moves one of them breaks this module
only, and `check_versions` names the range that was tested.
"""

import inspect
import re

import keras
import tensorflow as tf

#: Oldest releases the smoke set (tests/test_smoke.py) passes on: `.ci/run`
#: checks this pair in its own venv (`make test-oldest`); the full suite runs
#: on the newest. Below them: Keras 2 under TensorFlow <= 2.15.
MIN_TENSORFLOW = (2, 16, 2)
MIN_KERAS = (3, 0, 5)
#: Newest releases checked (newer ones are allowed, not yet checked).
CHECKED_TENSORFLOW = "2.21"
CHECKED_KERAS = "3.15"


def _release(version):
    """(major, minor, patch) of a version string such as '2.16.2', '3.4' or
    '2.17.0rc1' (missing or non-numeric parts count as 0); None if no
    major.minor."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not match:
        return None
    return tuple(int(part or 0) for part in match.groups())


def _dotted(release):
    return ".".join(map(str, release))


def supported_range():
    return (f"TensorFlow >= {_dotted(MIN_TENSORFLOW)} (checked up to {CHECKED_TENSORFLOW}) "
            f"with Keras >= {_dotted(MIN_KERAS)}, < 4 (checked up to {CHECKED_KERAS})")


def check_versions(tensorflow_version=None, keras_version=None):
    """Raises ImportError naming the installed versions and the supported range
    when TensorFlow or Keras is older than the floor (or Keras is not Keras 3)."""
    tensorflow_version = tf.__version__ if tensorflow_version is None else tensorflow_version
    keras_version = keras.__version__ if keras_version is None else keras_version
    problems = []
    tf_release, keras_release = _release(tensorflow_version), _release(keras_version)
    if tf_release is None or tf_release < MIN_TENSORFLOW:
        problems.append(f"TensorFlow {tensorflow_version}")
    if keras_release is None or keras_release < MIN_KERAS or keras_release[0] != 3:
        problems.append(f"Keras {keras_version}")
    if problems:
        raise ImportError(
            f"tfconvnorm does not support {' and '.join(problems)} (installed: TensorFlow "
            f"{tensorflow_version}, Keras {keras_version}); it needs {supported_range()}. "
            f"Upgrade, e.g. pip install 'tensorflow-cpu>={_dotted(MIN_TENSORFLOW)}' "
            f"'keras>={_dotted(MIN_KERAS)},<4'.")


# --- Keras models -------------------------------------------------------------


def is_variable(value):
    """True for a Keras variable. Up to Keras 3.4 `keras.Variable` is an export
    class that the backends' variables do not inherit from; they all derive
    from the common base `KerasVariable` (checked by name, nothing imported)."""
    if isinstance(value, keras.Variable):
        return True
    return any(cls.__name__ == "KerasVariable" for cls in type(value).__mro__)


def flatten_layers(model, include_self=False, recursive=True):
    """Every layer inside `model`, depth first, nested models and layers
    included, each once. Keras has no public recursive walk (`Model.layers` is
    one level deep); `Layer._flatten_layers` exists from 3.0 to 3.15."""
    return list(model._flatten_layers(include_self=include_self,  # pylint: disable=protected-access
                                      recursive=recursive))


def is_functional(model):
    """True for a model with a functional graph (Functional, and the inner model
    of a built Sequential): what `nodes_by_depth` reads."""
    return hasattr(model, "_nodes_by_depth") and hasattr(model, "inputs")


def functional_of(model):
    """The functional graph behind a model, or None (subclassed). A built
    Sequential keeps it as `_functional` (Keras 3.0 to 3.15)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if is_functional(model) else None


def nodes_by_depth(functional):
    """{depth: [graph nodes]} of a functional graph, inputs at the largest depth.
    No public API exposes the nodes (`Model.operations` has the layers only);
    `Function._nodes_by_depth` exists from 3.0 to 3.15."""
    return functional._nodes_by_depth  # pylint: disable=protected-access


def symbolic_build(model, data_batch):
    """Builds a compiled model's metrics and optimizer state from one batch, as
    `fit` would on its first step (`Trainer._symbolic_build`, 3.0 to 3.15),
    and stops `fit` from doing it again (`_maybe_symbolic_build`)."""
    model._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None  # pylint: disable=protected-access


def backup_and_restore(backup_dir):
    """`keras.callbacks.BackupAndRestore` keeping the previous backup until the
    new one is complete (`double_checkpoint`, Keras >= 3.5); older Keras
    writes one copy, which a kill during the write can leave unreadable."""
    callback = keras.callbacks.BackupAndRestore
    if "double_checkpoint" in inspect.signature(callback.__init__).parameters:
        return callback(backup_dir, double_checkpoint=True)
    return callback(backup_dir)


def tree_flatten(structure):
    """`keras.tree.flatten` (public since Keras 3.1); `tf.nest.flatten` lays out
    lists, tuples and dicts the same way."""
    tree = getattr(keras, "tree", None)
    return tree.flatten(structure) if tree is not None else tf.nest.flatten(structure)


# --- Keras weight files -------------------------------------------------------


def keras3_weights_layout(model):
    """{h5 dataset path: variable} of the `.weights.h5` file Keras 3 writes for
    `model`: Keras' own traversal (`saving_lib._save_state`, what
    `save_weights` runs; 3.0 to 3.15) with a store that records each path
    instead of writing it. Nothing is written, not even to the model."""
    from keras.src.saving import saving_lib  # pylint: disable=import-outside-toplevel

    class LayoutRecorder(saving_lib.H5IOStore):
        def __init__(self):  # pylint: disable=super-init-not-called  (no file behind it)
            self.mode = "w"
            self.layout = {}
            self._path = ""

        def __bool__(self):  # Keras asks the store whether it has a file
            return True

        def make(self, path, metadata=None):  # pylint: disable=unused-argument
            self._path = path
            return self

        def __setitem__(self, key, value):
            group = f"{self._path}/vars" if self._path else "vars"
            self.layout[f"{group}/{key}"] = value

    recorder = LayoutRecorder()
    saving_lib._save_state(model, recorder, None, "", set())  # pylint: disable=protected-access
    return {path: v for path, v in recorder.layout.items() if is_variable(v)}


# --- TensorFlow graphs ----------------------------------------------------------


def function_def_to_graph(function, input_shapes=None):
    """A `tf.Graph` of a `FunctionDef` (for reading a SavedModel's ops without
    loading it): TensorFlow offers no public API for this;
    `tensorflow.python.framework.function_def_to_graph` exists from 2.16 to
    2.21."""
    from tensorflow.python.framework import function_def_to_graph as convert  # pylint: disable=import-outside-toplevel
    return convert.function_def_to_graph(function, input_shapes=input_shapes)
