"""Projections of kernels onto {this support} intersected with {operator norm <= bound}."""

import functools

import numpy as np
import tensorflow as tf

from tfconvnorm.spectral import padding as padding_lib
from tfconvnorm.spectral.arguments import (check_method, check_positive, check_positive_int,
                                         per_geometry_function)
from tfconvnorm.spectral.linalg import clip_matrices, safe_scale
from tfconvnorm.spectral.operator import Geometry, tiny, work_dtypes
from tfconvnorm.spectral.pooling import (batch_arguments, clip_matrices_pooled, norms_of_stacks,
                                         plan, scatter)
from tfconvnorm.spectral.transforms import forward, inverse

#: The default method: the only cheap one that guarantees the bound.
DEFAULT_METHOD = "alternating"
#: Alternating-projection rounds before the final rescale. More rounds move
#: the result closer to the Euclidean projection (less shrinkage from the
#: rescale); the bound holds for any number.
DEFAULT_ALTERNATING_ITERATIONS = 4
#: Dykstra iterations cap and stopping tolerance (relative change of the
#: kernel between iterations) for method="exact".
DEFAULT_EXACT_MAX_ITERATIONS = 500
DEFAULT_EXACT_TOLERANCE = 1e-7


#: A kernel whose norm exceeds the bound by less than this (relative) counts
#: as inside: the rescale lands on the bound up to rounding, and projecting
#: our own output again must return it unchanged.
_INSIDE_RTOL = {tf.float32: 1e-6, tf.float64: 1e-12}


def _check_max_norm(max_norm):
    """`max_norm` checked as every argument is (`check_positive`); a tensor traced in a
    graph is checked by assertions when the graph runs."""
    if tf.is_tensor(max_norm) and not tf.executing_eagerly():
        message = f"`max_norm` must be a finite number > 0; received max_norm={max_norm!r}."
        value = tf.debugging.assert_all_finite(tf.cast(max_norm, tf.float64), message)
        with tf.control_dependencies([tf.debugging.assert_positive(value, message=message)]):
            return tf.identity(value)
    value = max_norm.numpy() if tf.is_tensor(max_norm) else max_norm
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    return check_positive(value, "max_norm")


def clip_conv_singular_values(kernel, input_shape, max_norm, strides=1, dilation_rate=1,
                              groups=1, method=DEFAULT_METHOD, iterations=None,
                              tolerance=DEFAULT_EXACT_TOLERANCE, padding=padding_lib.CIRCULAR):
    """Project a kernel towards {kernels of this support with operator norm <= max_norm}.

    The operator is the one `conv_operator_norm` measures with the same
    arguments: for "circular" the circular convolution on `input_shape`; for
    a zero padding the circular convolution on the embedding size N, which
    contains the layer as a submatrix, so that bounding it bounds the real
    layer's norm.

    Every per-frequency singular value above `max_norm` is clipped to it and
    the result is mapped back to a kernel of the original shape and support
    (the least-squares kernel, which for an input at least as large as the
    dilated kernel is the inverse DFT cut back to the support). That last
    step can raise the norm again; the methods differ in what they do next.

    Args:
      kernel, input_shape, strides, dilation_rate, groups, padding: as in
        `conv_singular_values`.
      max_norm: the bound, a positive finite number (or scalar tensor).
      method:
        * "rescale": divide the kernel by `norm / max_norm` where the norm is
          above the bound (`keras.constraints.MaxNorm` for the operator norm):
          one norm, no projection; guarantees the bound like "alternating" but
          shrinks every frequency, not only those above it. The default of
          `OperatorNormConstraint`, which runs after every optimizer step.
        * "alternating" (default): `iterations` rounds (default 4) of clip
          then cut back (alternating projections between the norm ball and
          the support), then one rescale by `max_norm / norm` if the norm is
          still above the bound. Guarantees
          `conv_operator_norm(result, ...) <= max_norm` up to float rounding
          (well inside `max_norm * (1 + 1e-4)`), hence for a zero padding
          that the real layer's norm is within the bound too.
        * "paper": the published single clip-then-cut (Sedghi et al. 2019),
          for reproducing the paper. Does not guarantee the bound.
        * "exact": the Euclidean (Frobenius) projection of the kernel onto
          {this support} intersected with {operator norm <= max_norm}, by
          Dykstra's alternating projections, stopped when an iteration
          changes the kernel by less than `tolerance` (relative) or after
          `iterations` (default 500); then the same guarantee rescale as
          "alternating" (a no-op once converged). Needs an input (for a zero
          padding: the embedding size N) at least as large as the dilated
          kernel on every axis (without folded taps the
          DFT is an isometry on kernels, which makes the operator-space
          projection the kernel-space one).
      iterations: rounds for "alternating" / cap for "exact".
      tolerance: stopping tolerance for "exact".

    Returns:
      A kernel of the same shape and dtype. For "alternating" and "exact" a
      kernel already inside the set is returned unchanged.

    Raises:
      ValueError: bad geometry, `max_norm` <= 0 or not finite, unknown method.
      tf.errors.InvalidArgumentError: NaN or Inf in the kernel (nothing is
        returned that could be written into a variable).
    """
    return clip_conv_singular_values_many(
        [kernel], [dict(input_shape=input_shape, strides=strides, dilation_rate=dilation_rate,
                        groups=groups, padding=padding)],
        max_norm, method=method, iterations=iterations, tolerance=tolerance)[0]


def clip_conv_singular_values_batch(kernels, input_shape, max_norm, strides=1, dilation_rate=1,
                                    groups=1, method=DEFAULT_METHOD, iterations=None,
                                    tolerance=DEFAULT_EXACT_TOLERANCE,
                                    padding=padding_lib.CIRCULAR):
    """`clip_conv_singular_values` of several kernels of one shape and geometry.

    One pass for all of them (each kernel is projected on its own: the
    operators are independent). Returns a tensor of shape
    `(len(kernels), *kernel_shape)`. Kernels already inside are returned
    unchanged, each on its own.
    """
    return tf.stack(clip_conv_singular_values_many(
        *batch_arguments(kernels, input_shape, strides, dilation_rate, groups, padding),
        max_norm,
        method=method, iterations=iterations, tolerance=tolerance))


def clip_conv_singular_values_many(kernels, geometries, max_norm, method=DEFAULT_METHOD,
                                   iterations=None, tolerance=DEFAULT_EXACT_TOLERANCE):
    """`clip_conv_singular_values` of many kernels of any shapes and geometries.

    Each kernel is projected on its own, with the same bound, and exactly as
    `clip_conv_singular_values` would (kernels inside come back unchanged);
    the decompositions of all of them are pooled, one op per matrix size.
    This is what `OperatorNormClipper` runs. `kernels` and `geometries` as
    for `conv_singular_values_many`; returns a list of kernels.
    """
    return clip_and_norms_many(kernels, geometries, max_norm, method, iterations, tolerance,
                               norms_before=False)[0]


def clip_and_norms_many(kernels, geometries, max_norm, method=DEFAULT_METHOD, iterations=None,
                        tolerance=DEFAULT_EXACT_TOLERANCE, norms_before=True):
    """`(clip_conv_singular_values_many(...), norms)`: with `norms_before`, also
    each kernel's operator norm before the projection (a list of scalars in
    the working dtype), from the projection's own first decomposition where
    that settles it: the clip's eigh (the largest singular value over every
    decomposed frequency, when no undecomposed one's bound exceeds it; else
    the exact norm, `norms_of_stacks`), or the exact norms that "rescale",
    "alternating" and "exact" compute anyway. Without it, `norms` is None.
    """
    check_method(method)
    max_norm = _check_max_norm(max_norm)
    if iterations is None:
        iterations = (DEFAULT_EXACT_MAX_ITERATIONS if method == "exact"
                      else DEFAULT_ALTERNATING_ITERATIONS)
    iterations = check_positive_int(iterations, "iterations")
    count, stacks = plan(kernels, geometries)
    if method == "exact":
        for stack in stacks:
            g = stack.geometry
            if g.folded:
                extent = tuple((k - 1) * r + 1 for k, r in zip(g.kernel_size, g.dilation_rate))
                where = "" if count == 1 else f"kernels[{stack.indices[0]}]: "
                size = (f"input_shape={g.input_shape}" if stack.layer.padding ==
                        padding_lib.CIRCULAR else
                        f"the circular embedding size {g.input_shape} of "
                        f"input_shape={stack.layer.layer_input_shape}")
                raise ValueError(
                    f"{where}method='exact' needs {size} at least as large as the dilated "
                    f"kernel {extent} on every axis; use method='alternating'")

    # The projection is positively homogeneous, so each kernel works on
    # kernel / max|kernel|: Gram matrices of a huge (diverged but finite)
    # kernel would overflow.
    works, bounds, scales, matrix_bounds = [], [], [], []
    for stack in stacks:
        original = tf.cast(stack.stacked, stack.real_dtype)
        scale = tf.reduce_max(tf.abs(tf.reshape(original, (-1, stack.count, stack.c_out))),
                              axis=[0, 2])
        scale = safe_scale(scale)
        # Via float64: tf.cast of a Python float would round it to float32 first.
        bound = tf.cast(tf.convert_to_tensor(max_norm, tf.float64), stack.real_dtype) / scale
        works.append(original / stack.per_channel(scale))
        scales.append(scale)
        bounds.append(bound)
        matrix_bounds.append(tf.repeat(bound, stack.groups_per_kernel)[None, :])

    def clip_once(ks, with_norms=False):
        clipped = clip_matrices_pooled([(stack.forward(k), b) for stack, k, b in
                                         zip(stacks, ks, matrix_bounds)], with_tops=with_norms)
        if with_norms:
            clipped, norms = zip(*[(m, _norms_from_tops(stack, k, tops, exact))
                                   for stack, k, (m, tops, exact) in zip(stacks, ks, clipped)])
        kernels = [inverse(m, stack.geometry, stack.real_dtype)
                   for stack, m in zip(stacks, clipped)]
        return (kernels, list(norms)) if with_norms else kernels

    def rescale(ks, norms):
        return [k * stack.per_channel(tf.where(n > b, b / n, tf.ones_like(n)))
                for stack, k, n, b in zip(stacks, ks, norms, bounds)]

    def is_inside(norms):
        return [n <= b * (1 + _INSIDE_RTOL[stack.real_dtype])
                for stack, n, b in zip(stacks, norms, bounds)]

    def finish(stack, k, scale):
        return tf.cast(k * stack.per_channel(scale), stack.out_dtype)

    def keep_inside(ks, inside):
        # Kernels inside stay the input itself, bit for bit.
        return [tf.where(stack.per_channel(i), stack.stacked, finish(stack, k, scale))
                for stack, k, i, scale in zip(stacks, ks, inside, scales)]

    before = None  # per stack, the norms of `works` (the kernels / `scales`)
    if method == "paper":
        clipped = clip_once(works, with_norms=norms_before)
        if norms_before:
            clipped, before = clipped
        results = [finish(*args) for args in zip(stacks, clipped, scales)]
    elif method == "rescale":
        # With norms wanted, the exact ones (the tap bound shortcut is not a norm);
        # where the shortcut applies both leave the kernel unchanged.
        norms = (norms_of_stacks(stacks, works) if norms_before else
                 _rescale_norms(stacks, works, bounds))
        before = norms
        results = keep_inside(rescale(works, norms), is_inside(norms))
    else:
        before = norms_of_stacks(stacks, works)
        inside = is_inside(before)

        def project():
            if method == "alternating":
                ks = works
                for _ in range(int(iterations)):
                    ks = clip_once(ks)
            else:
                ks = []
                for stack, k, b in zip(stacks, works, matrix_bounds):
                    g = stack.geometry
                    run = _dykstra_function(tuple(stack.stacked.shape), g.input_shape,
                                            g.strides, g.dilation_rate, g.groups,
                                            stack.real_dtype.name, int(iterations),
                                            float(tolerance))
                    ks.append(run(k, b))
            return keep_inside(rescale(ks, norms_of_stacks(stacks, ks)), inside)

        all_inside = tf.reduce_all(tf.concat(inside, axis=0))
        results = tf.cond(all_inside, lambda: [tf.identity(s.stacked) for s in stacks], project)
    kernels = scatter(count, stacks, [stack.unstack(r) for stack, r in zip(stacks, results)])
    if not norms_before:
        return kernels, None
    return kernels, scatter(count, stacks, [tf.unstack(n * scale) for n, scale in
                                            zip(before, scales)])


def _norms_from_tops(stack, kernel, tops, exact):
    """Per kernel of a stack, its operator norm from the clip's per-matrix tops
    ((freqs, count * groups): the largest singular value where decomposed,
    else an upper bound): the largest decomposed top, where no bound of an
    undecomposed matrix exceeds it; else, for the whole stack, the exact norm
    of `kernel` (the stacked kernels) by `norms_of_stacks`."""
    per_kernel = lambda x: tf.reduce_max(  # noqa: E731
        tf.reshape(x, (-1, stack.count, stack.groups_per_kernel)), axis=[0, 2])
    zeros = tf.zeros_like(tops)
    decomposed = per_kernel(tf.where(exact, tops, zeros))
    settled = decomposed >= per_kernel(tf.where(exact, zeros, tops))
    return tf.cond(tf.reduce_all(settled), lambda: decomposed,
                   lambda: norms_of_stacks([stack], [kernel])[0])


def _tap_bounds(stack, kernel):
    """Per kernel, sum over taps of the Frobenius norm of the tap: an upper bound
    on the norm of every operator with these taps (a sum over taps of a shift or
    subsampling, norm <= 1, times the tap's matrix), circular or embedded."""
    taps = tf.reshape(kernel, (stack.geometry.taps, -1, stack.count, stack.c_out))
    return tf.reduce_sum(tf.sqrt(tf.reduce_sum(tf.square(taps), axis=[1, 3])), axis=0)


def _rescale_norms(stacks, kernels, bounds):
    """Per stack, the norms the rescale divides by: the exact norm, or (where the
    tap bound already shows every kernel of the stack inside) that bound,
    which skips the transform and the decomposition."""
    norms = []
    for stack, k, b in zip(stacks, kernels, bounds):
        cheap = _tap_bounds(stack, k)
        norms.append(tf.cond(tf.reduce_all(cheap <= b), lambda cheap=cheap: cheap,
                             lambda stack=stack, k=k: norms_of_stacks([stack], [k])[0]))
    return norms


@functools.lru_cache(maxsize=64)
def _dykstra_function(kernel_shape, input_shape, strides, dilation_rate, groups, dtype_name,
                      max_iterations, tolerance):
    """Dykstra's loop as a tf.function per geometry: eagerly, hundreds of
    iterations of small ops would cost seconds."""
    geometry = Geometry(tf.TensorShape(kernel_shape), input_shape, strides, dilation_rate,
                         groups)
    real_dtype = tf.as_dtype(dtype_name)
    _, complex_dtype = work_dtypes(real_dtype)

    def run(kernel, bound):
        return _dykstra(kernel, geometry, bound, complex_dtype, real_dtype, max_iterations,
                        tolerance)

    return per_geometry_function(run, autograph=True)


def _dykstra(kernel, geometry, bound, complex_dtype, real_dtype, max_iterations, tolerance):
    """Dykstra's algorithm between the norm ball (per-frequency clip) and the
    support subspace (least-squares cut back). The subspace being linear, only
    the ball step needs a correction term."""
    matrices = forward(kernel, geometry, complex_dtype)
    tolerance = tf.cast(tolerance, real_dtype)

    def body(i, k, correction, _):
        shifted = forward(k, geometry, complex_dtype) + correction
        clipped = clip_matrices(shifted, bound)
        new_k = inverse(clipped, geometry, real_dtype)
        change = tf.norm(new_k - k) / tf.maximum(tf.norm(new_k), tiny(real_dtype))
        return i + 1, new_k, shifted - clipped, change

    def cond(i, k, correction, change):
        return tf.logical_and(i < max_iterations, change > tolerance)

    _, k, _, _ = tf.while_loop(
        cond, body,
        (tf.constant(0), kernel, tf.zeros_like(matrices), tf.constant(np.inf, real_dtype)))
    return k
