"""Installs tfconvnorm: exact singular values of convolutional layers in TensorFlow."""

import pathlib
import re

import setuptools

ROOT = pathlib.Path(__file__).parent
# The version is defined once, in the package.
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "tfconvnorm" / "__init__.py").read_text(),
                    re.M).group(1)

# TensorFlow itself is an extra so that CPU-only and GPU users each pick the
# right wheel: `pip install tfconvnorm[cpu]` or `pip install tfconvnorm[gpu]`.
# Users who already have a TensorFlow build installed need neither.
INSTALL_REQUIRES = [
    "numpy>=1.23",
    "absl-py>=1.0",
    # tensorflow-cpu does not pull in tensorboard, and tf.summary needs it.
    "tensorboard>=2.16",
    # The measured range (tfconvnorm/_compat.py checks it at import; `make
    # test-oldest` runs the smoke set on the floor pair).
    "keras>=3.0.5,<4",
]

EXTRAS_REQUIRE = {
    "cpu": ["tensorflow-cpu>=2.16.2"],
    "gpu": ["tensorflow[and-cuda]>=2.16.2"],
    "data": ["tensorflow-datasets>=4.9", "importlib_resources", "scikit-learn>=1.0"],
    "demo": ["matplotlib>=3.5", "scikit-learn>=1.0", "tensorflow-datasets>=4.9",
             "importlib_resources"],
    # Keras' other backends (the constraint, regularizer and callbacks run on
    # them; tested with jax 0.10.2 and torch 2.13.0, README "Backends"). A
    # bare `torch` is PyPI's default build (CUDA on Linux); CPU-only machines
    # pick a CPU wheel themselves, as the Makefile does.
    "jax": ["jax", "jaxlib"],
    "torch": ["torch"],
    "test": ["pytest>=7", "pytest-xdist>=3", "matplotlib>=3.5", "scikit-learn>=1.0",
             "tensorflow-datasets>=4.9", "importlib_resources", "h5py", "scipy>=1.8"],
}

setuptools.setup(
    name="tfconvnorm",
    version=VERSION,
    description=("Exact singular values, operator norms and operator-norm projections "
                 "of convolutional layers in TensorFlow / Keras."),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # Everything the tools need is inside the package: the top-level models/,
    # train.py, analyze.py and demo.py of a checkout are thin and not installed
    # (no generic top-level names in site-packages).
    packages=setuptools.find_packages(include=["tfconvnorm", "tfconvnorm.*"]),
    entry_points={"console_scripts": [
        "tfconvnorm-analyze = tfconvnorm.cli.analyze:run",
        "tfconvnorm-train = tfconvnorm.cli.train:run",
    ]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
    license_files=["LICENSE"],
)
