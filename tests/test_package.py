"""The installed package: importable without the optional pieces, and declared right."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _python(code):
    """Runs `code` in a fresh interpreter (nothing imported yet); must succeed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_import_works_without_matplotlib_tfds_or_absl_flags_parsing():
    # Keras itself imports matplotlib when it is installed, so block it and
    # TFDS outright: the library must not need either.
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"
        "sys.modules['tensorflow_datasets'] = None\n"
        "import numpy as np, tfconvnorm\n"
        "v = tfconvnorm.conv_operator_norm(np.eye(2, dtype='float32')[None, None], (4, 4))\n"
        "assert abs(float(v) - 1.0) < 1e-6, v\n"
        "print('ok')\n")
    result = _python(code)
    assert result.stdout.strip().endswith("ok")


def test_library_modules_import_matplotlib_only_inside_functions():
    for path in (ROOT / "tfconvnorm").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("matplotlib", "tensorflow_datasets", "models")
                           for n in names), f"{path.name} imports {names} at module level"


def test_setup_declares_tensorboard_and_both_tensorflow_flavours():
    text = (ROOT / "setup.py").read_text()
    assert '"tensorboard' in text
    assert '"tensorflow-cpu' in text and '"tensorflow[and-cuda]' in text


def test_checkout_models_are_the_installed_modules():
    """models/ in a checkout aliases tfconvnorm.models: one copy of the code, and
    patching one patches the other."""
    import models  # pylint: disable=import-outside-toplevel
    import models.cifar_input  # pylint: disable=import-outside-toplevel
    from models import resnet_v2  # pylint: disable=import-outside-toplevel
    from tfconvnorm import models as installed  # pylint: disable=import-outside-toplevel
    assert models.cifar_input is installed.cifar_input
    assert resnet_v2 is installed.resnet_v2
    assert models.cifar_resnet_v2 is installed.cifar_resnet_v2


def test_importing_the_tools_defines_no_flags():
    code = ("from absl import flags\n"
            "import tfconvnorm.cli.analyze, tfconvnorm.cli.train, tfconvnorm.analysis, "
            "tfconvnorm.training\n"
            "assert 'checkpoint' not in flags.FLAGS and 'model_dir' not in flags.FLAGS\n"
            "print('ok')\n")
    assert _python(code).stdout.strip().endswith("ok")
    for binary in ("train.py", "analyze.py"):
        assert len((ROOT / binary).read_text().splitlines()) < 120


def test_private_keras_and_tensorflow_names_live_in_one_module():
    private = ("keras.src", "_save_state", "_symbolic_build", "_nodes_by_depth",
               "_flatten_layers", "tensorflow.python")
    hits = {path.relative_to(ROOT).as_posix() for path in (ROOT / "tfconvnorm").rglob("*.py")
            if any(name in path.read_text() for name in private)}
    assert hits == {"tfconvnorm/_compat.py"}


@pytest.mark.parametrize("tensorflow_version,keras_version,bad", [
    ("2.15.1", "3.15.1", "TensorFlow 2.15.1"),
    ("2.16.1", "3.15.1", "TensorFlow 2.16.1"),
    ("2.21.0", "3.0.4", "Keras 3.0.4"),
    ("2.21.0", "2.15.0", "Keras 2.15.0"),
    ("2.21.0", "4.0.0", "Keras 4.0.0"),
    ("nightly", "3.15.1", "TensorFlow nightly"),
])
def test_an_unsupported_version_gets_one_clear_error(tensorflow_version, keras_version, bad):
    from tfconvnorm import _compat  # pylint: disable=import-outside-toplevel
    with pytest.raises(ImportError) as error:
        _compat.check_versions(tensorflow_version, keras_version)
    message = str(error.value)
    assert message.startswith("tfconvnorm does not support " + bad), message
    assert f"installed: TensorFlow {tensorflow_version}, Keras {keras_version}" in message
    assert _compat.supported_range() in message


def test_the_version_check_runs_at_import():
    # The real import path, with the installed version strings replaced.
    code = ("import keras, tensorflow as tf\n"
            "keras.__version__ = '3.0.4'\n"
            "try:\n"
            "    import tfconvnorm\n"
            "except ImportError as e:\n"
            "    print('ERROR', e)\n")
    out = _python(code).stdout
    assert out.startswith("ERROR tfconvnorm does not support Keras 3.0.4"), out


def test_the_supported_versions_are_declared_once_and_alike():
    from tfconvnorm import _compat  # pylint: disable=import-outside-toplevel
    setup = (ROOT / "setup.py").read_text()
    tf_floor = ".".join(map(str, _compat.MIN_TENSORFLOW))
    keras_floor = ".".join(map(str, _compat.MIN_KERAS))
    assert _compat.check_versions(tf_floor, keras_floor) is None
    assert f'"keras>={keras_floor}' in setup and f'"tensorflow-cpu>={tf_floor}' in setup
    assert f'"tensorflow[and-cuda]>={tf_floor}' in setup
    readme = (ROOT / "README.md").read_text()
    assert f"TensorFlow >= {tf_floor}" in readme and f"Keras >= {keras_floor}" in readme
    makefile = (ROOT / "Makefile").read_text()
    for pin in (f"keras=={keras_floor}", f"tensorflow-cpu=={tf_floor}"):
        assert re.search(re.escape(pin) + r"(?![\d.])", makefile), pin


def test_public_api_is_declared_and_every_name_exists():
    import tfconvnorm  # pylint: disable=import-outside-toplevel
    assert len(tfconvnorm.__all__) == len(set(tfconvnorm.__all__))
    missing = [name for name in tfconvnorm.__all__ if not hasattr(tfconvnorm, name)]
    assert not missing
    namespace = {}
    exec("from tfconvnorm import *", namespace)  # pylint: disable=exec-used
    assert set(namespace) - {"__builtins__"} == set(tfconvnorm.__all__)
    # What the start-up machinery and the compat layer are stays private.
    assert not {"_compat", "_startup"} & set(tfconvnorm.__all__)
