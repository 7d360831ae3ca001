"""Installs tfconvnorm: exact singular values of convolutional layers in TensorFlow."""

import setuptools

# TensorFlow itself is an extra so that CPU-only and GPU users each pick the
# right wheel: `pip install tfconvnorm[cpu]` or `pip install tfconvnorm[gpu]`.
# Users who already have a TensorFlow build installed need neither.
INSTALL_REQUIRES = [
    "numpy>=1.23",
    "absl-py>=1.0",
    # tensorflow-cpu does not pull in tensorboard, and tf.summary needs it.
    "tensorboard>=2.16",
    "keras>=3.0",
]

EXTRAS_REQUIRE = {
    "cpu": ["tensorflow-cpu>=2.16"],
    "gpu": ["tensorflow[and-cuda]>=2.16"],
    "data": ["tensorflow-datasets>=4.9", "importlib_resources"],
    "demo": ["matplotlib>=3.5", "scikit-learn>=1.0", "tensorflow-datasets>=4.9",
             "importlib_resources"],
    "test": ["pytest>=7", "pytest-xdist>=3", "matplotlib>=3.5", "scikit-learn>=1.0",
             "tensorflow-datasets>=4.9", "importlib_resources", "h5py"],
}

setuptools.setup(
    name="tfconvnorm",
    version="0.1.0",
    description=("Exact singular values, operator norms and operator-norm projections "
                 "of convolutional layers in TensorFlow / Keras."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["tfconvnorm"],
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
