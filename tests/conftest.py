"""Shared pytest setup: quiet TensorFlow logs before TF is imported anywhere."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
