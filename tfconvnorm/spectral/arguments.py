"""Argument checks shared by every public function (and by the Keras glue).

Errors name the argument and the value received.
"""

import math

import numpy as np
import tensorflow as tf

#: Projection methods accepted by `clip_conv_singular_values`.
METHODS = ("alternating", "paper", "exact", "rescale")
#: Dtypes the core computes in; others (float16, bfloat16, ints) go via float32.
CORE_DTYPES = (tf.float32, tf.float64)


def int_tuple(value, rank, name, allow_none=False):
    """An int or a sequence of `rank` positive ints, as a tuple: the one parser of
    per-axis arguments (sizes, strides, dilations).

    rank=None: any number of entries, and an int stays an int (a constraint's
    config, whose rank only the kernel fixes). allow_none: entries may be None
    (a spatial size a Keras model leaves open).
    """
    scalar = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if scalar:
        items = (int(value),) * (1 if rank is None else rank)
    else:
        try:
            items = tuple(value)
        except TypeError:
            what = f"a sequence of {rank} ints" if rank else "a tuple of ints"
            raise ValueError(f"{name} must be an int or {what}, "
                             f"got {name}={value!r}") from None
        if rank is not None and len(items) != rank:
            raise ValueError(f"{name} must have {rank} entries (one per spatial axis of "
                             f"the kernel), got {name}={value!r}")
        for item in items:
            if item is None and allow_none:
                continue
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                raise ValueError(f"{name} must hold ints, got {name}={value!r}")
        items = tuple(item if item is None else int(item) for item in items)
    for item in items:
        if item is not None and item <= 0:
            raise ValueError(f"{name} must be positive, got {name}={value!r}")
    return items[0] if scalar and rank is None else items


def check_positive_int(value, argument, allow_none=False):
    """`value` as a Python int if it is a positive int (NumPy ints too), or None
    where allowed."""
    if value is None and allow_none:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or value < 1):
        raise ValueError(f"`{argument}` must be a positive int{' or None' if allow_none else ''}; "
                         f"received {argument}={value!r}.")
    return int(value)


def check_method(method, argument="method"):
    """`method` if it is one of `METHODS`."""
    if method not in METHODS:
        raise ValueError(f"`{argument}` must be one of {METHODS}; received "
                         f"{argument}={method!r}.")
    return method


def check_positive(value, argument, allow_zero=False):
    """A finite number > 0 (>= 0 with allow_zero), as a Python float."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{argument}` must be a finite number {bound}; received "
                         f"{argument}={value!r}.")
    return value


def core_tensor(value):
    """`value` (array, tensor or Keras variable) as a tensor in a dtype the core
    computes in, and its own dtype (to cast results back to)."""
    if hasattr(value, "value") and not tf.is_tensor(value):
        value = value.value
    if not tf.is_tensor(value) and not isinstance(value, np.ndarray) and hasattr(value, "shape"):
        # A tensor of Keras' JAX or PyTorch backend: to the host first (a
        # PyTorch tensor that requires grad has no __array__).
        import keras  # pylint: disable=import-outside-toplevel
        value = keras.ops.convert_to_numpy(value)
    tensor = tf.convert_to_tensor(value)
    dtype = tensor.dtype
    return (tensor if dtype in CORE_DTYPES else tf.cast(tensor, tf.float32)), dtype


def per_geometry_function(fn, autograph=False):
    """`fn` as a tf.function of its own, one of many (one per layer geometry).

    Each geometry traces once, by design; TensorFlow counts traces per Python
    code object, not per function, and would warn about "excessive retracing"
    on any network with more than five layer shapes. The warning is switched
    off for these functions only (a private attribute; harmless if it goes).
    """
    compiled = tf.function(fn, autograph=autograph, jit_compile=False)
    compiled._omit_frequent_tracing_warning = True  # pylint: disable=protected-access
    return compiled
