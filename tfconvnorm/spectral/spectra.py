"""The public spectra: transfer matrices, all singular values, the operator norm."""

import functools

import numpy as np
import tensorflow as tf

from tfconvnorm.spectral import padding as padding_lib
from tfconvnorm.spectral.arguments import per_geometry_function
from tfconvnorm.spectral.operator import Geometry, prepare_kernel, work_dtypes
from tfconvnorm.spectral.pooling import (batch_arguments, norms_of_stacks, plan, scatter,
                                         singular_values_pooled)
from tfconvnorm.spectral.transforms import forward, forward_parts


def _frozen(value):
    """A hashable copy of an argument (lists from configs become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, np.integer):
        return int(value)
    return value


@functools.lru_cache(maxsize=512)
def _compiled_single(many_name, kernel_shape, dtype_name, geometry):
    """`conv_*_many` of one kernel as a tf.function, one per geometry: called
    eagerly layer by layer, the op-by-op dispatch of the Python path cost
    several times the computation itself."""
    many = globals()[many_name]
    kwargs = dict(geometry)

    def run(kernel):
        return many([kernel], [kwargs])[0]

    return per_geometry_function(run)


def _single(many, kernel, **geometry):
    """`many([kernel], [geometry])[0]`, compiled once per geometry when eager."""
    if not tf.executing_eagerly():
        return many([kernel], [geometry])[0]
    kernel = tf.convert_to_tensor(kernel)  # checked (finite, real) inside the function
    key = tuple(sorted((k, _frozen(v)) for k, v in geometry.items()))
    try:
        hash(key)
    except TypeError:  # an unusual argument type: let the plain path name it
        return many([kernel], [geometry])[0]
    run = _compiled_single(many.__name__, tuple(kernel.shape), kernel.dtype.name, key)
    return run(kernel)


def conv_transfer_matrices(kernel, input_shape, strides=1, dilation_rate=1, groups=1,
                           padding=padding_lib.CIRCULAR):
    """The per-frequency matrices whose singular values are the operator's.

    Args:
      kernel: Keras layout `(*spatial, c_in // groups, c_out)`, array or tensor.
      input_shape: spatial input size (an int: the same on every axis).
      strides, dilation_rate: int or per-axis tuple, as Keras layers take them.
      groups: channel groups (`c_in` for depthwise).
      padding: as in `conv_singular_values`; for a zero padding, the
        matrices are those of the circular operator on the embedding size N.

    Returns:
      `(matrices, weights)`: complex `matrices` of shape
      `(frequencies, groups, c_out // groups, prod(strides) * c_in // groups)`
      (complex64 for float32 kernels, complex128 for float64) and int64
      `weights` of shape `(frequencies,)`: how many frequencies of the full
      spectrum each matrix stands for (conjugate pairs count twice; a
      frequency-independent matrix counts for all). The operator's singular
      values are those of every matrix, each repeated `weights` times.
    """
    kernel = prepare_kernel(kernel)
    geometry = Geometry(kernel.shape, input_shape, strides, dilation_rate, groups, padding)
    _, complex_dtype = work_dtypes(kernel.dtype)
    # Stored transposed (see `forward`); returned as P(w).
    return (tf.linalg.matrix_transpose(forward(kernel, geometry, complex_dtype)),
            tf.constant(geometry.weights))


def conv_singular_values(kernel, input_shape, strides=1, dilation_rate=1, groups=1,
                         padding=padding_lib.CIRCULAR):
    """Every singular value of a convolution's operator, or bounds on them.

    With `padding="circular"` (the default, the published operator), the
    exact singular values of the circular ("wrap-around") convolution on
    `input_shape`. With a zero padding ("same", "valid", "causal" or
    explicit pads, as the layer has), the layer is a submatrix of the
    circular convolution on a larger size N (`circular_embedding(...)
    .input_shape`), and the result is the largest singular values of that
    circular operator, as many as the layer has: entry i is a certified
    upper bound on the layer's i-th singular value (Cauchy interlacing).

    Args:
      kernel: Keras layout `(*spatial, c_in // groups, c_out)` for a 1-D, 2-D
        or 3-D convolution (a rank-2 `(in, out)` matrix with `input_shape=()`
        for a Dense layer); NumPy array or tensor, float32 or float64.
      input_shape: the spatial input size (no batch, no channels); an int
        means that size on every spatial axis. It may be smaller than the
        kernel: wrapped taps fold onto each other, as in the operator.
      strides: int or per-axis tuple; for "circular" each stride must divide
        its input size (any stride, for a zero padding).
      dilation_rate: int or per-axis tuple.
      groups: number of channel groups; `c_in` for a depthwise convolution.
      padding: "circular", "same", "valid", "causal" (1-D), or per-axis
        `(before, after)` pairs of explicit zero pads. TensorFlow's rule
        gives the pads of "same" (the extra one after) and "causal".
        Ignored for a Dense kernel (no boundary).

    Returns:
      A 1-D tensor in the kernel's dtype, sorted descending, multiplicities
      kept, holding the layer's number of singular values, block by block
      over groups: `groups * min(prod(out) * c_out / groups, prod(input_shape)
      * c_in / groups)` with `out` the layer's output size (for "circular",
      `input_shape / strides`).

    Raises:
      ValueError: inconsistent shapes, a stride that does not divide the
        input size ("circular"), a kernel that does not fit ("valid"), or
        non-positive sizes.
      tf.errors.InvalidArgumentError: NaN or Inf in the kernel.
    """
    return _single(conv_singular_values_many, kernel, input_shape=input_shape, strides=strides,
                   dilation_rate=dilation_rate, groups=groups, padding=padding)


def conv_singular_values_batch(kernels, input_shape, strides=1, dilation_rate=1, groups=1,
                               padding=padding_lib.CIRCULAR):
    """`conv_singular_values` of several kernels of one shape and geometry, in one pass.

    Cheaper than a loop (a network has many layers of the same shape). Takes
    a list of kernels; returns a tensor of shape `(len(kernels), count)`, row
    b the sorted spectrum of `kernels[b]`.
    """
    return tf.stack(conv_singular_values_many(
        *batch_arguments(kernels, input_shape, strides, dilation_rate, groups, padding)))


def conv_singular_values_many(kernels, geometries):
    """`conv_singular_values` of many kernels of any shapes and geometries, in one pass.

    What a whole network needs: kernels that share a shape and geometry are
    stacked, and every per-frequency matrix of one size, whichever layer it
    comes from, goes through a single decomposition op.

    Args:
      kernels: a list of kernels, each as for `conv_singular_values`.
      geometries: a list of the same length; entry i holds kernel i's
        geometry as a dict of `conv_singular_values`' keyword arguments
        (`input_shape`, and optionally `strides`, `dilation_rate`, `groups`,
        `padding`),
        or an object with a `spectral_kwargs()` method returning one (as
        `tfconvnorm.ConvGeometry` does).

    Returns:
      A list: entry i is `conv_singular_values(kernels[i], **geometries[i])`.
    """
    count, stacks = plan(kernels, geometries)
    # The decomposition runs in complex128 (the Gram route squares the
    # condition number), so the transform is done in float64 straight away.
    entries = []
    for stack in stacks:
        real, imag = forward_parts(stack.stacked, stack.geometry, tf.float64)
        # Where every axis is frequency-independent (1x1 convs, Dense) the
        # matrices are real: real Gram and eigvalsh, 4x fewer flops. float64
        # kernels go by SVD, for full relative accuracy.
        entries.append((real, None if stack.geometry.real else imag,
                        stack.real_dtype == tf.float64))
    pooled = singular_values_pooled(entries)
    per_stack = []
    for stack, values in zip(stacks, pooled):
        frequencies = values.shape[0]
        per_frequency = values.shape[1] * values.shape[2] // stack.count
        values = tf.transpose(tf.reshape(values, (frequencies, stack.count, per_frequency)),
                              [1, 0, 2])
        repeats = tf.repeat(tf.constant(stack.geometry.weights), per_frequency)
        values = tf.repeat(tf.reshape(values, (stack.count, -1)), repeats, axis=1)
        values = tf.sort(values, axis=-1, direction="DESCENDING")
        # A padded layer has fewer singular values than the circular operator
        # on N; the largest ones bound its own entry by entry.
        values = tf.cast(values[:, :stack.layer.count], stack.out_dtype)
        per_stack.append(tf.unstack(values) if stack.count > 1 else [values[0]])
    return scatter(count, stacks, per_stack)


def conv_operator_norm(kernel, input_shape, strides=1, dilation_rate=1, groups=1,
                       padding=padding_lib.CIRCULAR):
    """The largest singular value of the circular operator, or an upper bound
    on the zero-padded layer's.

    Same arguments as `conv_singular_values`. For "circular", the exact norm
    of the circular convolution on `input_shape`; for a zero padding, the
    exact norm of the circular convolution on the embedding size N, which is
    an upper bound on the layer's norm (use `conv_operator_norm_bounds` for a
    certified interval). Differentiable with respect to the kernel. Exact,
    not an estimate: cheap Gram-iteration bounds select the few frequencies
    that can hold the maximum, and only those are decomposed, by `eigvalsh`
    in complex128 (so this runs on a GPU too). The result has the kernel's
    dtype.
    """
    return _single(conv_operator_norm_many, kernel, input_shape=input_shape, strides=strides,
                   dilation_rate=dilation_rate, groups=groups, padding=padding)


def conv_operator_norm_batch(kernels, input_shape, strides=1, dilation_rate=1, groups=1,
                             padding=padding_lib.CIRCULAR):
    """`conv_operator_norm` of several kernels of one shape and geometry, in one
    pass; returns a tensor of shape `(len(kernels),)`. Differentiable."""
    return tf.stack(conv_operator_norm_many(
        *batch_arguments(kernels, input_shape, strides, dilation_rate, groups, padding)))


def conv_operator_norm_many(kernels, geometries):
    """`conv_operator_norm` of many kernels of any shapes and geometries, in one pass.

    Arguments as for `conv_singular_values_many`; returns a list of scalar
    tensors, entry i the norm of `kernels[i]` in its dtype. Differentiable.
    """
    count, stacks = plan(kernels, geometries)
    norms = norms_of_stacks(stacks, [stack.stacked for stack in stacks])
    return scatter(count, stacks, [tf.unstack(tf.cast(n, stack.out_dtype))
                                    for stack, n in zip(stacks, norms)])
