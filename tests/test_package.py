"""The installed package: importable without the optional pieces, and declared right."""

import ast
import pathlib
import subprocess
import sys

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
