"""Certified intervals for the operator norm of the layer a user has.

Upper: the exact norm of the circular operator on the embedding size N,
which contains the zero-padded layer as a submatrix (`padding`), so it is
at least the layer's norm.

Lower: ||A v|| / ||v|| is at most ||A|| for every v != 0, so any vector
gives a certified lower bound. v is the top Ritz vector of a few Lanczos
iterations on A^T A, where A is the real layer (`apply_convolution`:
`tf.nn.convolution` with the layer's own padding, TensorFlow computing the
pads) and A^T its exact adjoint by automatic differentiation. This is a
different code path from the DFT, so an error in either shows up as
lower > upper.

Both ends are evaluated in float64 and widened by a rounding allowance
(`CERTIFIED_RTOL`), so that `lower <= ||A|| <= upper` holds for the
computed numbers themselves, not only up to rounding.
"""

import functools
import typing

import numpy as np
import tensorflow as tf

from tfconvnorm.spectral import padding as padding_lib
from tfconvnorm.spectral.operator import Geometry, prepare_kernel
from tfconvnorm.spectral.pooling import check_list, norms_of_stacks, plan, scatter

#: Lanczos iterations (applications of A^T A) behind the lower bound.
DEFAULT_POWER_ITERATIONS = 32
#: Relative allowance for float64 rounding on both ends of an interval: the
#: transforms, Gram matrices and convolutions of these sizes lose well under
#: 1e-12 (relative) in float64.
CERTIFIED_RTOL = 1e-9


#: Lanczos stops adding directions where the new residual is below this
#: fraction of ||A^T A|| (its largest diagonal entry so far): rounding noise
#: of the reorthogonalisation, not a direction.
_BREAKDOWN = {tf.float32: 1e-4, tf.float64: 1e-10}


class NormBounds(typing.NamedTuple):
    """A certified interval `lower <= ||layer|| <= upper` (float64 scalars)."""

    lower: typing.Any
    upper: typing.Any


def _wrap(x, geometry):
    """x padded circularly so that a 'VALID' convolution of it is the circular one."""
    for axis, (n, s, k, d) in enumerate(zip(geometry.layer_input_shape, geometry.strides,
                                            geometry.kernel_size, geometry.dilation_rate)):
        needed = (n // s - 1) * s + (k - 1) * d + 1
        x = tf.gather(x, np.arange(needed) % n, axis=axis + 1)
    return x


def apply_convolution(x, kernel, geometry):
    """The layer itself: `kernel` (conv layout) applied to `x` of shape
    `(batch, *layer_input_shape, c_in)` with `geometry`'s padding, strides,
    dilation and groups, by TensorFlow's convolutions (differentiable; the
    gradient is the exact adjoint).

    Ungrouped 'same' / 'valid' convolutions let TensorFlow work out the pads
    itself. TensorFlow's CPU kernels have no gradient for grouped
    convolutions and no strides with dilation: depthwise kernels go through
    `tf.nn.depthwise_conv2d`, other grouped ones group by group, and where a
    stride cannot be passed on, the stride-1 output is subsampled.
    """
    g = geometry
    rank = g.rank
    strides, dilations = list(g.strides), list(g.dilation_rate)
    if g.padding == padding_lib.CIRCULAR:
        x, mode = _wrap(x, g), "VALID"
    elif g.groups == 1 and g.padding in ("same", "valid"):
        mode = g.padding.upper()  # TensorFlow's own rule for the pads
    else:
        x, mode = tf.pad(x, [[0, 0]] + [list(p) for p in g.pads] + [[0, 0]]), "VALID"
    depthwise = g.groups > 1 and g.c_in_group == 1 and rank <= 2
    subsample = max(strides) > 1 and (max(dilations) > 1 or depthwise)
    step = [1] * rank if subsample else strides
    if depthwise:
        if rank == 1:  # as 2-D, with a height of 1
            x, kernel = x[:, None], kernel[None]
        shape = tuple(kernel.shape)
        y = tf.nn.depthwise_conv2d(
            x, tf.reshape(kernel, shape[:2] + (g.groups, shape[-1] // g.groups)),
            [1] + ([1] * (2 - rank) + step) + [1], mode,
            dilations=[1] * (2 - rank) + dilations)
        y = y[:, 0] if rank == 1 else y
    elif g.groups > 1:
        y = tf.concat([tf.nn.convolution(part, k, step, mode, dilations=dilations)
                       for part, k in zip(tf.split(x, g.groups, axis=-1),
                                          tf.split(kernel, g.groups, axis=-1))], axis=-1)
    else:
        y = tf.nn.convolution(x, kernel, step, mode, dilations=dilations)
    if subsample:
        y = y[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    return y


@functools.lru_cache(maxsize=256)
def _lanczos_function(geometry_key, iterations):
    """Lanczos on A^T A for one padded operator, compiled per geometry.

    Power iteration converges slowly on convolutions (their top singular
    values cluster); Lanczos, with full reorthogonalisation, finds a far
    better vector in the same number of operator applications. The Ritz
    vector is then evaluated on the layer directly, so the bound does not
    depend on the Krylov basis being exactly orthonormal.
    """
    kernel_shape, dtype_name, kwargs = geometry_key
    g = Geometry(tf.TensorShape(kernel_shape), **dict(kwargs))
    dtype = tf.as_dtype(dtype_name)
    shape = (1,) + g.layer_input_shape + (g.c_in,)
    size = int(np.prod(shape))

    @tf.function(autograph=False, jit_compile=False)
    def lower_bound(kernel):
        # Scaled to max |entry| 1, so that squares neither overflow nor underflow.
        scale = tf.reduce_max(tf.abs(kernel))
        unit = kernel / tf.where(scale > 0, scale, tf.ones_like(scale))

        def gram(v):  # A^T A v, the adjoint by automatic differentiation
            x = tf.reshape(v, shape)
            with tf.GradientTape() as tape:
                tape.watch(x)
                energy = 0.5 * tf.reduce_sum(tf.square(apply_convolution(x, unit, g)))
            return tf.reshape(tape.gradient(energy, x), [-1])

        start = tf.random.stateless_normal([size], seed=[7, 0], dtype=dtype)
        basis = tf.tensor_scatter_nd_update(tf.zeros([iterations + 1, size], dtype), [[0]],
                                            [start / tf.norm(start)])

        def step(j, basis, alphas, betas):
            v = basis[j]
            w = gram(v)
            alpha = tf.tensordot(w, v, 1)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = w - tf.linalg.matvec(basis, tf.linalg.matvec(basis, w), transpose_a=True)
            beta = tf.norm(w)
            # Breakdown (the Krylov space is invariant, or exhausted): what is
            # left of w is rounding, not a new direction. Later steps then see
            # v = 0 and add nothing.
            alive = beta > _BREAKDOWN[dtype] * tf.reduce_max(tf.abs(alphas) + tf.abs(alpha))
            beta = tf.where(alive, beta, tf.zeros_like(beta))
            basis = tf.tensor_scatter_nd_update(
                basis, [[j + 1]], [tf.where(alive, w / tf.where(alive, beta, 1), 0 * w)])
            return (j + 1, basis, tf.tensor_scatter_nd_update(alphas, [[j]], [alpha]),
                    tf.tensor_scatter_nd_update(betas, [[j]], [beta]))

        if iterations:
            _, basis, alphas, betas = tf.while_loop(
                lambda j, *_: j < iterations, step,
                (tf.constant(0), basis, tf.zeros([iterations], dtype),
                 tf.zeros([iterations], dtype)))
            tridiagonal = (tf.linalg.diag(alphas) + tf.linalg.diag(betas[:-1], k=1)
                           + tf.linalg.diag(betas[:-1], k=-1))
            _, vectors = tf.linalg.eigh(tf.cast(tridiagonal, tf.float64))
            ritz = tf.linalg.matvec(tf.cast(basis[:iterations], tf.float64), vectors[:, -1],
                                    transpose_a=True)
        else:
            ritz = tf.cast(basis[0], tf.float64)
        x = tf.reshape(ritz, shape)
        y = apply_convolution(x, tf.cast(kernel, tf.float64), g)
        length = tf.norm(x)
        return tf.where(length > 0, tf.norm(y) / tf.where(length > 0, length, 1.0),
                        0.0) * (1 - CERTIFIED_RTOL)

    return lower_bound


def _geometry_key(kernel, g):
    kwargs = (("input_shape", g.layer_input_shape), ("strides", g.strides),
              ("dilation_rate", g.dilation_rate), ("groups", g.groups),
              ("padding", g.padding))
    dtype = kernel.dtype if kernel.dtype in (tf.float32, tf.float64) else tf.float32
    return (tuple(kernel.shape), dtype.name, kwargs)


def _is_the_circular_operator(g):
    """True where the layer is the circular operator on N itself (no pads,
    N = n, every circular output kept): 1x1 'same' convs, Dense layers."""
    return (g.padding == padding_lib.CIRCULAR or g.rank == 0 or (
        g.input_shape == g.layer_input_shape
        and all(p == (0, 0) for p in g.pads)
        and all(o * s == n for o, s, n in zip(g.layer_output_shape, g.strides, g.input_shape))))


def conv_operator_norm_bounds(kernel, input_shape, strides=1, dilation_rate=1, groups=1,
                              padding=padding_lib.CIRCULAR, iterations=DEFAULT_POWER_ITERATIONS):
    """A certified interval `(lower, upper)` for the norm of the layer's operator.

    Arguments as for `conv_singular_values`. `upper` is the exact norm of the
    circular operator on the embedding size N (for "circular": on
    `input_shape`, the operator itself); `lower` is ||A v|| / ||v|| for the
    real layer A (`tf.nn.convolution` with this padding) at the top Ritz
    vector of `iterations` Lanczos iterations on A^T A, which is a lower
    bound after any number of them (0: a random vector). Where the layer is the circular operator itself
    ("circular", Dense kernels, 1x1 convs without pads) the exact norm gives
    both ends. Both ends are computed in float64 and widened by
    `CERTIFIED_RTOL`, so `lower <= ||A|| <= upper` holds as computed.

    Returns:
      `NormBounds(lower, upper)`, float64 scalar tensors. Not differentiable
      (use `conv_operator_norm` to train on the upper bound).
    """
    return conv_operator_norm_bounds_many(
        [kernel], [dict(input_shape=input_shape, strides=strides, dilation_rate=dilation_rate,
                        groups=groups, padding=padding)], iterations=iterations)[0]


def conv_operator_norm_bounds_many(kernels, geometries, iterations=DEFAULT_POWER_ITERATIONS):
    """`conv_operator_norm_bounds` of many kernels of any geometries.

    `kernels` and `geometries` as for `conv_singular_values_many`; the upper
    bounds of all kernels are pooled into one pass. Returns a list of
    `NormBounds`.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) \
            or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got iterations={iterations!r}")
    kernels = check_list("kernels", kernels)
    kernels = [prepare_kernel(k, "kernel" if len(kernels) == 1 else f"kernels[{i}]")
               for i, k in enumerate(kernels)]
    # Upper bounds in float64: a float32 kernel is exactly representable.
    count, stacks = plan([tf.cast(k, tf.float64) for k in kernels], geometries)
    uppers = scatter(count, stacks, [tf.unstack(n) for n in norms_of_stacks(
        stacks, [stack.stacked for stack in stacks])])
    layers = scatter(count, stacks, [[stack.layer] * stack.count for stack in stacks])
    result = []
    for kernel, exact, g in zip(kernels, uppers, layers):
        upper = exact * (1 + CERTIFIED_RTOL)
        if _is_the_circular_operator(g):
            lower = exact * (1 - CERTIFIED_RTOL)
        else:
            work = kernel if kernel.dtype in (tf.float32, tf.float64) else tf.cast(kernel,
                                                                                   tf.float32)
            lower = _lanczos_function(_geometry_key(work, g), int(iterations))(work)
        result.append(NormBounds(lower, upper))
    return result
