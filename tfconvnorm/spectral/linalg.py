"""Per-matrix linear algebra on batches of per-frequency matrices.

Gram matrices in real arithmetic, singular values (Hermitian `eigvalsh`
with an SVD fallback), the exact largest singular value of many operators
with Gram-iteration pruning, and the singular-value clip. Complex products
are done as real matmuls: TF's complex64 kernels are several times slower.
"""

import functools

import tensorflow as tf

from tfconvnorm.spectral.operator import tiny


#: A float32 Gram eigenvalue below this fraction of the largest one is
#: recomputed by SVD: the complex128 Gram loses about eps64 * lambda_max, so
#: above this threshold a singular value keeps ~1e-7 relative accuracy.
_GRAM_CONDITION_THRESHOLD = 1e-8

#: Squarings of the Gram matrix behind the cheap per-frequency bounds that
#: pick the candidates for the largest singular value, by matrix size
#: (size limit, squarings, first squaring after which to prune). After j
#: squarings the upper bound is within a factor size^(1/2^j) of the truth:
#: too loose to prune anything before the first pruning stage (on ResNet-32's
#: 64x64 matrices nearly all survive 2 squarings, a small fraction 3), and
#: the exact complex128 decomposition of each remaining candidate costs more
#: than the last squarings of the few survivors. Timings: BENCHMARKS.md
#: (`make bench`, the breakdown workload).
_GRAM_SQUARINGS = ((16, 3, 1), (32, 4, 2), (None, 5, 3))


#: Squarings between renormalisations of the powers: with trace 1, the top
#: eigenvalue is >= 1/size (>= 1/64 where bounds are used), and after 3
#: squarings its square (64^-16, in the Frobenius norm) is still above
#: float32's smallest normal number.
_RENORMALISE_EVERY = {tf.float32: 3, tf.float64: 6}
#: Up to this Gram size TF's complex128 matmul beats Gauss's three float64
#: matmuls (`_gram`); above it, not (the crossover found with `make bench`).
_NATIVE_COMPLEX_GRAM_MAX_SIZE = 32
#: Relative rounding allowance on those bounds, so that no candidate is lost.
_BOUND_SLACK = {tf.float32: 1e-4, tf.float64: 1e-10}
#: Above this matrix size the squarings cost more than a working-precision
#: eigvalsh of every matrix (sizes up to 64 favour the bounds, 128 and up
#: eigvalsh, with `make bench`), which screens instead.
_GRAM_BOUNDS_MAX_SIZE = 64
#: Allowance on the screening eigenvalues: complex64 eigvalsh is backward
#: stable, so its largest eigenvalue is within ~size * 6e-8 (relative).
_SCREEN_SLACK = {tf.float32: 1e-3, tf.float64: 1e-10}


def _frobenius(x, axis=(-2, -1)):
    """sqrt(sum |x|^2) over `axis`: the one singular value of a row or column,
    and for a Gram matrix an upper bound on its largest eigenvalue."""
    return tf.sqrt(tf.reduce_sum(tf.math.square(tf.abs(x)), axis=axis))


def _frobenius_parts(real, imag, axis=(-2, -1)):
    """`_frobenius` of real + i imag, without forming the complex tensor."""
    return tf.sqrt(tf.reduce_sum(tf.square(real) + tf.square(imag), axis=axis))


def gram_parts(real, imag):
    """Real and imaginary parts of the smaller Gram matrix of P = real + i imag:
    P P^H or P^H P.

    Four real matmuls instead of one complex one: TF's real kernels are
    several times faster than its complex ones, and the transposes ride
    inside the matmuls (no concat or transpose pass over the batch).
    (Gauss's three-matmul trick is no faster at these sizes.)
    """
    rows, cols = real.shape[-2:]
    if rows <= cols:  # P P^H
        mm = functools.partial(tf.matmul, transpose_b=True)
        return mm(real, real) + mm(imag, imag), mm(imag, real) - mm(real, imag)
    mm = functools.partial(tf.matmul, transpose_a=True)  # P^H P
    return mm(real, real) + mm(imag, imag), mm(real, imag) - mm(imag, real)


def _hermitian_square(real, imag):
    """Parts of H^2 for Hermitian H = real + i imag."""
    return (tf.matmul(real, real) - tf.matmul(imag, imag),
            tf.matmul(real, imag) + tf.matmul(imag, real))


def _gram(real, imag=None):
    """The smaller Gram matrix, P P^H or P^H P, of P = real + i imag (imag
    None: a real P, real Gram matrix), as one tensor.

    complex64 goes through `gram_parts`. For complex128, TF's complex matmul
    wins on small matrices; above `_NATIVE_COMPLEX_GRAM_MAX_SIZE` it is only
    as fast as four float64 matmuls, and Gauss's trick needs three
    (`_gram_gauss`). The Gram matrix is most of the cost of a full spectrum
    of wide layers (ResNet50V2's 512-channel convs).
    """
    rows, cols = real.shape[-2:]
    if imag is None:
        return tf.matmul(real, real, transpose_b=rows <= cols, transpose_a=rows > cols)
    if real.dtype != tf.float64:
        return tf.complex(*gram_parts(real, imag))
    if min(rows, cols) <= _NATIVE_COMPLEX_GRAM_MAX_SIZE:
        matrices = tf.complex(real, imag)
        return tf.matmul(matrices, matrices, adjoint_b=rows <= cols, adjoint_a=rows > cols)
    return _gram_gauss(real, imag)


def _gram_gauss(real, imag):
    """`_gram` of real + i imag in three real matmuls, complex. With
    P^H P = (R^T R + I^T I) + i (R^T I - I^T R):
    R^T I - I^T R = (R - I)^T (R + I) - R^T R + I^T I (P P^H likewise)."""
    rows, cols = real.shape[-2:]
    if rows <= cols:
        mm = functools.partial(tf.matmul, transpose_b=True)
        mixed = mm(real + imag, real - imag)
    else:
        mm = functools.partial(tf.matmul, transpose_a=True)
        mixed = mm(real - imag, real + imag)
    squares_real, squares_imag = mm(real, real), mm(imag, imag)
    return tf.complex(squares_real + squares_imag, mixed - squares_real + squares_imag)


def matrix_singular_values(real, imag, use_svd):
    """Singular values of each matrix real + i imag (imag None: real
    matrices), float64 parts of shape (batch, rows, cols); ascending, float64."""
    rows, cols = real.shape[-2:]

    def whole(index=None):  # the matrices (or those at `index`) as one tensor
        pick = (lambda x: x) if index is None else functools.partial(tf.gather_nd, indices=index)
        return pick(real) if imag is None else tf.complex(pick(real), pick(imag))

    if min(rows, cols) == 1:
        return _frobenius(whole(), -1 if rows == 1 else -2)
    if use_svd:
        return tf.reverse(tf.linalg.svd(whole(), compute_uv=False), axis=[-1])
    eigenvalues = tf.math.real(tf.linalg.eigvalsh(_gram(real, imag)))
    values = tf.sqrt(tf.maximum(eigenvalues, 0.0))
    # Ill-conditioned matrices (and exactly singular ones) lose their small
    # singular values in the Gram matrix; redo just those with an SVD.
    lam_max = eigenvalues[..., -1:]
    poor = tf.where(eigenvalues[..., 0] <= _GRAM_CONDITION_THRESHOLD * lam_max[..., 0])
    redone = tf.reverse(tf.linalg.svd(whole(poor), compute_uv=False), axis=[-1])
    return tf.tensor_scatter_nd_update(values, poor, redone)


def safe_scale(scale):
    """Per-operator max |entry| as a divisor that keeps squares in range: 1
    where an operator is all zeros."""
    return tf.where(scale > 0, scale, tf.ones_like(scale))


def _top_eigenvalues(real, imag, indices):
    """Exact largest eigenvalue of the Gram matrix of each matrix `indices`
    points at, in complex128 (differentiable)."""
    chosen = [tf.cast(tf.gather(x, indices), tf.float64) for x in (real, imag)]
    return tf.math.real(tf.linalg.eigvalsh(_gram(*chosen)))[:, -1]


def largest_singular_values(real, imag, segment, count):
    """The largest singular value of each of `count` operators, exactly.

    `real` and `imag` (the parts of the matrices; imag None: real matrices)
    have shape (batch, rows, cols); matrix j belongs to operator `segment[j]`. Entries must be of
    moderate size (the callers scale kernels to max |entry| 1): Gram
    matrices are formed in the working precision.

    Decomposing every frequency is wasteful when only the maximum matters.
    Gram iteration gives upper bounds ||G^(2^j)||_F^(1/2^j) on each matrix's
    largest eigenvalue, within a factor size^(1/2^j) of it, and Rayleigh
    quotients give lower bounds; the best lower bound L of an operator is a
    lower bound on its maximum. Matrices whose upper bound is below L cannot
    hold the maximum and drop out before the next squaring (squarings and
    the first pruning stage by size: `_GRAM_SQUARINGS`); the few left after
    the last squaring are decomposed exactly, in complex128. Above
    `_GRAM_BOUNDS_MAX_SIZE` a working-precision eigvalsh screens instead.
    Gradients flow through the exact decompositions.
    """
    rows, cols = real.shape[-2:]
    dtype = real.dtype
    if imag is None:
        # Real matrices (one frequency: Dense layers, 1x1 convs): there are as
        # many as operators times groups, so each is decomposed exactly, with a
        # real float64 Gram matrix and eigvalsh, at a quarter of the complex cost.
        if min(rows, cols) == 1:
            top = tf.square(_frobenius(tf.cast(real, tf.float64)))
        else:
            top = tf.linalg.eigvalsh(_gram(tf.cast(real, tf.float64)))[:, -1]
        top = tf.math.unsorted_segment_max(top, segment, count)
        return tf.cast(tf.sqrt(tf.maximum(top, 0.0)), dtype)
    if min(rows, cols) == 1:
        return tf.math.unsorted_segment_max(_frobenius_parts(real, imag), segment, count)
    gram_real, gram_imag = gram_parts(real, imag)
    if min(rows, cols) > _GRAM_BOUNDS_MAX_SIZE:
        # Squarings cost more than eigvalsh itself at this size: screen with
        # eigvalsh in the working precision (complex64 for float32 kernels,
        # cheaper, its largest eigenvalue good to ~size * eps), then redo
        # the contenders in complex128.
        screen = tf.math.real(tf.linalg.eigvalsh(tf.complex(gram_real, gram_imag)))[:, -1]
        best = tf.math.unsorted_segment_max(screen, segment, count)
        candidates = tf.where(screen >= tf.gather(best, segment) * (1 - _SCREEN_SLACK[dtype]))
        candidates = candidates[:, 0]
        top = tf.math.unsorted_segment_max(_top_eigenvalues(real, imag, candidates),
                                           tf.gather(segment, candidates), count)
        return tf.cast(tf.sqrt(tf.maximum(top, 0.0)), dtype)

    slack = _BOUND_SLACK[dtype]
    size = min(rows, cols)
    squarings, first_stage = next((j, first) for limit, j, first in _GRAM_SQUARINGS
                                  if limit is None or size <= limit)
    trace = tf.linalg.trace(gram_real)
    index = tf.range(tf.shape(real, out_type=tf.int64)[0])   # surviving matrices
    # A first lower bound where pruning starts after one squaring: the exact
    # top eigenvalue of each operator's largest-trace matrix (often the
    # maximum itself; a handful of small decompositions that run beside the
    # first squaring). Later stages have good Rayleigh bounds of their own.
    if first_stage == 1:
        largest_trace = tf.math.unsorted_segment_max(trace, segment, count)
        picked = tf.where(trace >= tf.gather(largest_trace, segment))[:, 0]
        lower = tf.math.unsorted_segment_max(_top_eigenvalues(real, imag, picked),
                                             tf.gather(segment, picked), count)
    else:
        lower = tf.zeros([count], tf.float64)
    # P_j = G^(2^j) / exp(log_scale_j), normalised to trace 1 at the start and
    # every few squarings so that nothing over- or underflows (the largest
    # eigenvalue of a trace-1 matrix of size n is at least 1/n).
    renormalise_every = _RENORMALISE_EVERY[dtype]
    power_real, power_imag, log_scale = gram_real, gram_imag, tf.zeros_like(trace, tf.float64)
    for j in range(1, squarings + 1):
        if (j - 1) % renormalise_every == 0:
            norm = tf.maximum(tf.linalg.trace(power_real), tiny(dtype))[:, None, None]
            power_real, power_imag = power_real / norm, power_imag / norm
            log_scale = log_scale + tf.math.log(tf.cast(norm[:, 0, 0], tf.float64))
        power_real, power_imag = _hermitian_square(power_real, power_imag)
        log_scale = 2 * log_scale
        if j < first_stage:
            continue  # bounds this loose would prune (almost) nothing
        # |entry|^2 summed per column: the diagonal of P_j^2.
        column_squares = tf.reduce_sum(tf.square(power_real) + tf.square(power_imag), axis=-2)
        frobenius_squared = tf.reduce_sum(column_squares, -1)
        # Rayleigh quotient of P_j at w = P_(j-1) e_k:
        # w^H P_j w / w^H w = (P_j^2)_kk / (P_j)_kk, at the best k. No matvec.
        diagonal = tf.linalg.diag_part(power_real)
        rayleigh = tf.reduce_max(
            tf.where(diagonal > 0, column_squares / tf.maximum(diagonal, tiny(dtype)), 0.0), -1)

        def root(x, j=j):  # the lambda_max(G) bound from a bound on lambda_max(P_j)
            return tf.exp((log_scale + tf.math.log(tf.cast(x, tf.float64))) / 2 ** j)

        upper = root(tf.sqrt(frobenius_squared))
        survivor_segment = tf.gather(segment, index)
        lower = tf.maximum(lower, tf.math.unsorted_segment_max(
            root(tf.maximum(rayleigh, tiny(dtype))), survivor_segment, count))
        keep = tf.where(tf.logical_and(
            upper >= tf.gather(lower, survivor_segment) * (1 - slack),
            frobenius_squared > 0))[:, 0]
        index = tf.gather(index, keep)
        if j < squarings:
            power_real, power_imag = tf.gather(power_real, keep), tf.gather(power_imag, keep)
            log_scale = tf.gather(log_scale, keep)
    top = tf.math.unsorted_segment_max(_top_eigenvalues(real, imag, index),
                                       tf.gather(segment, index), count)
    return tf.cast(tf.sqrt(tf.maximum(top, 0.0)), dtype)


def _complex_matmul_parts(a_real, a_imag, b_real, b_imag, transpose_b=False):
    """Parts of A B (or A B^H with transpose_b) in four real matmuls: TF's
    complex64 matmul is slower than that on small batched matrices."""
    mm = functools.partial(tf.matmul, transpose_b=transpose_b)
    sign = -1.0 if transpose_b else 1.0  # B^H = B_r^T - i B_i^T
    return (mm(a_real, b_real) - sign * mm(a_imag, b_imag),
            sign * mm(a_real, b_imag) + mm(a_imag, b_real))


def clip_matrices(matrices, max_norm, with_tops=False):
    """Clip every matrix's singular values at max_norm (the Frobenius-nearest
    matrix with spectral norm <= max_norm), through the Gram matrix's eigh,
    which unlike complex SVD has GPU kernels. `max_norm` broadcasts against
    the batch shape `matrices.shape[:-2]`.

    Matrices whose Gram matrix has Frobenius norm (an upper bound on the
    squared spectral norm) within max_norm^2 are left as they are: when
    most are, only the others are gathered and decomposed; when most are
    not (ResNet-32 at He initialisation and bound 1: none is), every matrix
    is decomposed in place, which saves the gather and the scatter (those
    cost ~15% of the projection). Tighter Gram-iteration bounds cost more
    than they save here.

    With `with_tops`, returns `(clipped, tops, exact)`: per matrix (batch
    shape) the largest singular value of the input from its decomposition
    where it was decomposed (`exact` True), else the upper bound
    sqrt(||G||_F) that left it undecomposed. The clipper's "before" norms
    come from these, without a decomposition of their own.
    """
    rows, cols = matrices.shape[-2:]
    real_dtype = matrices.dtype.real_dtype
    max_norm = tf.broadcast_to(tf.cast(max_norm, real_dtype), tf.shape(matrices)[:-2])
    if min(rows, cols) == 1:
        # A row or column: its Frobenius norm is its only singular value.
        sigma = _frobenius(matrices)
        scale = tf.minimum(tf.ones_like(sigma), max_norm / tf.maximum(sigma, tiny(real_dtype)))
        clipped = matrices * tf.cast(scale, matrices.dtype)[..., None, None]
        return (clipped, sigma, tf.ones_like(sigma, tf.bool)) if with_tops else clipped
    shape = tf.shape(matrices)
    flat = tf.reshape(matrices, (-1, rows, cols))
    bound = tf.reshape(max_norm, [-1])
    real, imag = tf.math.real(flat), tf.math.imag(flat)
    gram_real, gram_imag = gram_parts(real, imag)

    def clip(real, imag, gram_real, gram_imag, bound):
        eigenvalues, vectors = tf.linalg.eigh(tf.complex(gram_real, gram_imag))
        sigma = tf.sqrt(tf.maximum(tf.math.real(eigenvalues), 0.0))
        # Scale factor 1 for every singular value already below the bound
        # (and for zero ones); max_norm / sigma above it.
        bound = bound[:, None]
        factor = tf.where(sigma > bound, bound / tf.maximum(sigma, bound), 1.0)[:, None, :]
        v_real, v_imag = tf.math.real(vectors), tf.math.imag(vectors)
        # shrink = V diag(factor) V^H, then shrink A (or A shrink).
        shrink = _complex_matmul_parts(v_real * factor, v_imag * factor, v_real, v_imag,
                                       transpose_b=True)
        parts = (_complex_matmul_parts(*shrink, real, imag) if rows <= cols
                 else _complex_matmul_parts(real, imag, *shrink))
        return parts + (sigma[:, -1],)   # eigenvalues ascend: the top is last

    gram_frobenius = _frobenius_parts(gram_real, gram_imag)
    over = gram_frobenius > tf.square(bound) * (1 - _BOUND_SLACK[real_dtype])

    # The tops (and the scatter of those decomposed into the bounds) only when
    # asked for: the alternating and Dykstra loops clip many times without them.
    def all_matrices():
        clipped_real, clipped_imag, top = clip(real, imag, gram_real, gram_imag, bound)
        return (clipped_real, clipped_imag) + ((top, tf.ones_like(over)) if with_tops else ())

    def only_those_over():
        index = tf.where(over)
        pick = functools.partial(tf.gather_nd, indices=index)
        clipped_real, clipped_imag, top = clip(pick(real), pick(imag), pick(gram_real),
                                               pick(gram_imag), pick(bound))
        scattered = (tf.tensor_scatter_nd_update(real, index, clipped_real),
                     tf.tensor_scatter_nd_update(imag, index, clipped_imag))
        if not with_tops:
            return scattered
        return scattered + (tf.tensor_scatter_nd_update(tf.sqrt(gram_frobenius), index, top),
                            over)

    count_over = tf.reduce_sum(tf.cast(over, tf.int32))
    outputs = tf.cond(2 * count_over > tf.size(over), all_matrices, only_those_over)
    clipped = tf.reshape(tf.complex(outputs[0], outputs[1]), shape)
    if not with_tops:
        return clipped
    return clipped, tf.reshape(outputs[2], shape[:-2]), tf.reshape(outputs[3], shape[:-2])
