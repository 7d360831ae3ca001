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

Small layers (`EXPLICIT_MAX_COLUMNS`) get both ends from their exact norm:
the largest singular value of their explicit matrix, built by applying the
layer to basis vectors.

Both ends are evaluated in float64 and widened by a rounding allowance
(`CERTIFIED_RTOL`), so that `lower <= ||A|| <= upper` holds for the
computed numbers themselves, not only up to rounding.
"""

import functools
import typing

import numpy as np
import tensorflow as tf

from tfconvnorm.spectral import padding as padding_lib
from tfconvnorm.spectral.arguments import core_tensor, per_geometry_function
from tfconvnorm.spectral.operator import Geometry, prepare_kernel
from tfconvnorm.spectral.pooling import check_list, norms_of_stacks, plan, scatter

#: Lanczos iterations (applications of A^T A) behind the lower bound.
DEFAULT_POWER_ITERATIONS = 32
#: Relative allowance for float64 rounding on both ends of an interval: the
#: transforms, Gram matrices and convolutions of these sizes lose well under
#: 1e-12 (relative) in float64.
CERTIFIED_RTOL = 1e-9


#: Layers with at most this many columns per group (input positions times
#: input channels of a group; rows likewise, or fewer) get their exact norm
#: from their explicit matrix: on small feature maps (the last stages of
#: ImageNet networks at small inputs) the circular embedding is loose.
EXPLICIT_MAX_COLUMNS = 256
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
def _lanczos_function(geometry_key, count, iterations):
    """Lanczos on A^T A for `count` operators of one geometry, compiled once.

    Power iteration converges slowly on convolutions (their top singular
    values cluster); Lanczos, with full reorthogonalisation, finds a far
    better vector in the same number of operator applications. Each kernel
    has its own Krylov space (row k of every array); the Ritz vector is then
    evaluated on the layer directly, so the bound does not depend on the
    basis being exactly orthonormal. One trace serves every kernel of the
    geometry: on networks of many small layers, tracing costs more than the
    iterations.
    """
    kernel_shape, dtype_name, kwargs = geometry_key
    g = Geometry(tf.TensorShape(kernel_shape), **dict(kwargs))
    dtype = tf.as_dtype(dtype_name)
    shape = (1,) + g.layer_input_shape + (g.c_in,)
    size = int(np.prod(shape))

    def apply_each(x, kernels):  # (count, size) -> [count outputs]
        return [apply_convolution(tf.reshape(x[k], shape), kernels[k], g) for k in range(count)]

    def lower_bounds(kernels):
        # Scaled to max |entry| 1, so that squares neither overflow nor underflow.
        scale = tf.reduce_max(tf.abs(tf.reshape(kernels, (count, -1))), axis=1)
        units = kernels / tf.reshape(tf.where(scale > 0, scale, tf.ones_like(scale)),
                                     (count,) + (1,) * len(kernel_shape))

        def gram(v):  # A^T A v, the adjoint by automatic differentiation
            with tf.GradientTape() as tape:
                tape.watch(v)
                energy = 0.5 * tf.add_n([tf.reduce_sum(tf.square(y))
                                         for y in apply_each(v, units)])
            return tape.gradient(energy, v)

        start = tf.random.stateless_normal([count, size], seed=[7, 0], dtype=dtype)
        start = start / tf.norm(start, axis=1, keepdims=True)

        def step(j, basis, alphas, betas):
            v = basis[:, j]
            w = gram(v)
            alpha = tf.reduce_sum(w * v, axis=1)
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = w - tf.einsum("kjs,kj->ks", basis, tf.einsum("kjs,ks->kj", basis, w))
            beta = tf.norm(w, axis=1)
            # Breakdown (the Krylov space is invariant, or exhausted): what is
            # left of w is rounding, not a new direction. Later steps then see
            # v = 0 and add nothing.
            largest = tf.reduce_max(tf.abs(alphas), axis=1)
            alive = beta > _BREAKDOWN[dtype] * tf.maximum(largest, tf.abs(alpha))
            beta = tf.where(alive, beta, tf.zeros_like(beta))
            new = tf.where(alive[:, None], w / tf.where(alive, beta, 1)[:, None], 0 * w)
            index = tf.stack([tf.range(count), tf.fill([count], j + 1)], axis=1)
            at_j = tf.stack([tf.range(count), tf.fill([count], j)], axis=1)
            return (j + 1, tf.tensor_scatter_nd_update(basis, index, new),
                    tf.tensor_scatter_nd_update(alphas, at_j, alpha),
                    tf.tensor_scatter_nd_update(betas, at_j, beta))

        if iterations:
            basis = tf.concat([start[:, None], tf.zeros([count, iterations, size], dtype)], 1)
            _, basis, alphas, betas = tf.while_loop(
                lambda j, *_: j < iterations, step,
                (tf.constant(0), basis, tf.zeros([count, iterations], dtype),
                 tf.zeros([count, iterations], dtype)))
            tridiagonal = (tf.linalg.diag(alphas) + tf.linalg.diag(betas[:, :-1], k=1)
                           + tf.linalg.diag(betas[:, :-1], k=-1))
            _, vectors = tf.linalg.eigh(tf.cast(tridiagonal, tf.float64))
            ritz = tf.einsum("kjs,kj->ks", tf.cast(basis[:, :iterations], tf.float64),
                             vectors[:, :, -1])
        else:
            ritz = tf.cast(start, tf.float64)
        outputs = apply_each(ritz, tf.cast(kernels, tf.float64))
        lengths = tf.norm(ritz, axis=1)
        images = tf.stack([tf.norm(y) for y in outputs])
        return tf.where(lengths > 0, images / tf.where(lengths > 0, lengths, 1.0),
                        0.0) * (1 - CERTIFIED_RTOL)

    return per_geometry_function(lower_bounds)


@functools.lru_cache(maxsize=256)
def _explicit_function(geometry_key, count):
    """The exact norms of `count` small layers of one geometry, from their
    explicit matrices (float64), compiled once.

    Every group's block of the matrix has one column per (input position,
    input channel of the group); a basis vector that sets that channel of
    *every* group at once gives all groups' columns in one convolution, so
    `positions * c_in / groups` basis vectors build every block.
    """
    kernel_shape, _, kwargs = geometry_key
    g = Geometry(tf.TensorShape(kernel_shape), **dict(kwargs))
    positions = int(np.prod(g.layer_input_shape))
    columns = positions * g.c_in_group
    basis = np.eye(columns).reshape((columns,) + g.layer_input_shape + (g.c_in_group,))
    # NumPy, not a tensor: this may be built inside another tf.function's graph.
    basis = np.tile(basis, (1,) * (g.rank + 1) + (g.groups,))

    def exact_norms(kernels):
        norms = []
        for k in range(count):
            y = apply_convolution(tf.constant(basis), tf.cast(kernels[k], tf.float64), g)
            # (columns, *out, groups * c_out_group) -> (groups, rows, columns)
            y = tf.reshape(y, (columns, -1, g.groups, g.c_out_group))
            blocks = tf.reshape(tf.transpose(y, [2, 1, 3, 0]), (g.groups, -1, columns))
            transpose = blocks.shape[1] < columns  # the smaller Gram matrix
            gram = tf.matmul(blocks, blocks, transpose_a=not transpose, transpose_b=transpose)
            top = tf.reduce_max(tf.linalg.eigvalsh(gram)[:, -1])
            norms.append(tf.sqrt(tf.maximum(top, 0.0)))
        return tf.stack(norms)

    return per_geometry_function(exact_norms)


def _is_small(g):
    """Layers whose explicit matrix is cheap: the exact norm beats any bound."""
    columns = int(np.prod(g.layer_input_shape)) * g.c_in_group
    rows = int(np.prod(g.layer_output_shape)) * g.c_out_group
    return columns <= EXPLICIT_MAX_COLUMNS and min(rows, columns) * max(rows, columns) \
        <= EXPLICIT_MAX_COLUMNS * EXPLICIT_MAX_COLUMNS


def _geometry_key(kernel, g):
    kwargs = (("input_shape", g.layer_input_shape), ("strides", g.strides),
              ("dilation_rate", g.dilation_rate), ("groups", g.groups),
              ("padding", g.padding))
    return (tuple(kernel.shape), kernel.dtype.name, kwargs)


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
    bound after any number of them (0: a random vector). Where the layer is
    the circular operator itself ("circular", Dense kernels, 1x1 convs
    without pads), or small enough for its explicit matrix (at most
    `EXPLICIT_MAX_COLUMNS` input positions times input channels per group),
    the exact norm gives both ends. Both ends are computed in
    float64 and widened by `CERTIFIED_RTOL`, so `lower <= ||A|| <= upper`
    holds as computed.

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
    bounds of all kernels are pooled into one pass, and the Lanczos
    iterations of kernels that share a shape and geometry run in one
    compiled call. Returns a list of `NormBounds`.
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
    lowers = [exact * (1 - CERTIFIED_RTOL) for exact in uppers]
    uppers = [exact * (1 + CERTIFIED_RTOL) for exact in uppers]
    iterated, explicit = {}, {}
    for index, (kernel, g) in enumerate(zip(kernels, layers)):
        if not _is_the_circular_operator(g):
            kernel, _ = core_tensor(kernel)
            target = explicit if _is_small(g) else iterated
            target.setdefault(_geometry_key(kernel, g), []).append((index, kernel))
    for key, members in iterated.items():
        run = _lanczos_function(key, len(members), int(iterations))
        values = run(tf.stack([kernel for _, kernel in members]))
        for (index, _), value in zip(members, tf.unstack(values)):
            lowers[index] = value
    for key, members in explicit.items():
        values = _explicit_function(key, len(members))(tf.stack([k for _, k in members]))
        for (index, _), value in zip(members, tf.unstack(values)):
            lowers[index] = value * (1 - CERTIFIED_RTOL)
            uppers[index] = value * (1 + CERTIFIED_RTOL)
    return [NormBounds(lower, upper) for lower, upper in zip(lowers, uppers)]
