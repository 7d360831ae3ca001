"""From a model's operators to their kernels, spectra, certified norm intervals and
projections: the one path that training, the callbacks and the checkpoint
records take (the spectral core does the math).

Each `make_*_fn` returns one compiled call over every operator's current
kernel (a `tf.function` reading the variables under TensorFlow; under Keras'
JAX and PyTorch backends the kernels are copied to NumPy and TensorFlow
computes on the host).
"""

import keras
import tensorflow as tf

from tfconvnorm import spectral
from tfconvnorm.spectral.arguments import check_method, check_positive, core_tensor
from tfconvnorm.spectral.projection import clip_and_norms_many

#: The clipper's default projection: the published one.
DEFAULT_CLIPPER_METHOD = "paper"


def norm_intervals(operators, iterations=spectral.DEFAULT_POWER_ITERATIONS):
    """`[(lower, upper)]`: a certified interval for each operator's norm as the
    model computes it (floats), from the kernels as they are now."""
    operators = list(operators)
    if not operators:
        return []
    lower, upper = make_bounds_fn(operators, iterations)()
    return list(zip(map(float, lower.numpy()), map(float, upper.numpy())))


def make_projection_fn(operators, max_norm, method=DEFAULT_CLIPPER_METHOD, iterations=None,
                       compute_norms=True):
    """One compiled call that projects every kernel in `operators` in place.

    The clipped kernels are all computed before any is assigned, so a
    failure (a NaN or Inf kernel raises `InvalidArgumentError`) leaves every
    variable untouched. Not XLA-compiled: batched complex `eigh` is far
    slower under XLA.

    Args:
      operators: `LayerOperator`s, e.g. from `tfconvnorm.model_geometry`.
      max_norm: the bound, a finite number > 0.
      method, iterations: see `tfconvnorm.clip_conv_singular_values`.
      compute_norms: also return each kernel's operator norm before and after
        the projection (before: from the projection's own decomposition where
        that settles it; after: one more decomposition per kernel).

    Returns:
      A callable taking no arguments and returning `(before, after)`: float32
      tensors of shape `(len(operators),)` (empty when `compute_norms` is
      False), a `tf.function` that traces once (on its first call, or on
      `get_concrete_function()`); under JAX / PyTorch a function around one
      (kernels copied to NumPy, results assigned after all are computed).
    """
    check_positive(max_norm, "max_norm")
    check_method(method)
    operators = list(operators)
    if not operators:
        raise ValueError("`operators` is empty: there is nothing to project.")

    geometries = [op.geometry for op in operators]

    def compute(values):
        convs, dtypes = spectral_kernels(operators, values, with_dtypes=True)
        # One pooled call for all kernels: one decomposition per matrix size;
        # the norms before come from the projection's own decomposition.
        clipped, before = clip_and_norms_many(convs, geometries, max_norm, method, iterations,
                                              norms_before=compute_norms)
        if compute_norms:
            before = tf.stack([tf.cast(n, tf.float32) for n in before])
            after = tf.stack([tf.cast(n, tf.float32) for n in
                              spectral.conv_operator_norm_many(clipped, geometries)])
        else:
            before = after = tf.zeros([0], tf.float32)
        new_values = [tf.cast(op.from_spectral(c), dtype)
                      for op, c, dtype in zip(operators, clipped, dtypes)]
        return new_values, before, after

    if not _on_host():
        @tf.function(autograph=False, jit_compile=False)
        def project():
            new_values, before, after = compute([op.variable for op in operators])
            # All or nothing: no assignment before every projection succeeded.
            with tf.control_dependencies(new_values + [before, after]):
                for op, value in zip(operators, new_values):
                    op.variable.assign(value)
            return tf.identity(before), tf.identity(after)

        return project

    compiled = _host_function(operators, compute)

    def project_on_host():
        new_values, before, after = compiled()
        # All computed before any is assigned, as above.
        for op, value in zip(operators, new_values):
            op.variable.assign(value.numpy())
        return before, after

    project_on_host.get_concrete_function = compiled.get_concrete_function
    return project_on_host


def _on_host():
    """True under Keras' JAX and PyTorch backends: the spectral core is
    TensorFlow's, so the callbacks move the kernels to NumPy and run it on the
    host (CPU or whatever TensorFlow sees), outside the backend's train step."""
    return keras.backend.backend() != "tensorflow"


def _host_function(operators, fn):
    """`fn(values)` (every operator's kernel, TensorFlow tensors in the
    variables' layouts) as one `tf.function`, called with no arguments on the
    operators' current kernels, which are copied to NumPy first. Traces once
    (input signature: the variables' shapes and dtypes)."""
    specs = [tf.TensorSpec(op.variable.shape, op.variable.dtype) for op in operators]
    compiled = tf.function(lambda *values: fn(list(values)), input_signature=specs,
                           autograph=False, jit_compile=False)

    def call():
        return compiled(*[keras.ops.convert_to_numpy(op.variable.value) for op in operators])

    call.get_concrete_function = compiled.get_concrete_function
    return call


def spectral_kernels(operators, values=None, with_dtypes=False):
    """Every operator's kernel (its variable, or `values[i]`) in the conv layout
    and a core dtype (and, with `with_dtypes`, the kernels' own dtypes)."""
    values = [op.variable for op in operators] if values is None else values
    pairs = [core_tensor(value) for value in values]
    kernels = [op.to_spectral(value) for op, (value, _) in zip(operators, pairs)]
    return (kernels, [dtype for _, dtype in pairs]) if with_dtypes else kernels


def _over_kernels(operators, fn):
    """`fn(values)` over the operators' current kernels as one compiled call
    without arguments: under TensorFlow reading the variables inside the
    `tf.function`, under JAX / PyTorch on NumPy copies (`_host_function`)."""
    if _on_host():
        return _host_function(operators, fn)
    return tf.function(lambda: fn([op.variable for op in operators]), autograph=False,
                       jit_compile=False)


def make_spectra_fn(operators):
    """One compiled call returning the full spectrum of every operator (descending):
    for zero-padded layers, the entrywise upper bound on the layer's spectrum.
    Under JAX / PyTorch the kernels are copied to the host and TensorFlow
    computes there."""
    operators = list(operators)
    geometries = [op.geometry for op in operators]

    def spectra(values):
        return spectral.conv_singular_values_many(spectral_kernels(operators, values),
                                                  geometries)

    return _over_kernels(operators, spectra)


def make_bounds_fn(operators, iterations=spectral.DEFAULT_POWER_ITERATIONS):
    """One compiled call returning `(lower, upper)`: float64 tensors of shape
    `(len(operators),)`, a certified interval for each layer's operator norm
    (`tfconvnorm.conv_operator_norm_bounds_many`); on the host under JAX /
    PyTorch, as `make_spectra_fn`."""
    operators = list(operators)
    geometries = [op.geometry for op in operators]

    def bounds(values):
        pairs = spectral.conv_operator_norm_bounds_many(spectral_kernels(operators, values),
                                                        geometries, iterations=iterations)
        return tf.stack([p.lower for p in pairs]), tf.stack([p.upper for p in pairs])

    return _over_kernels(operators, bounds)
