"""The methods tfconvnorm is compared against, written as their authors wrote them.

These are competitors, not library code: each keeps its own published
numerics (its own FFT, SVD or iteration) so the benchmark times what people
actually run. Only the Gram iteration reuses the core's per-frequency matrices,
because that is the input Delattre et al. define it on.

- `published_tf_singular_values` / `published_tf_clip`: Sedghi, Gupta & Long
  (ICLR 2019) in TensorFlow: FFT of the zero-padded kernel, `tf.linalg.svd`,
  (clip, inverse FFT, truncate). 2-D only; strides are ignored, as published.
- `reshaped_kernel_power_iteration`: `keras.layers.SpectralNormalization`:
  power iteration on the kernel reshaped to (k*k*c_in, c_out). That is the
  norm of a different matrix, not of the convolution operator.
- `operator_power_iteration`: TF Model Garden's `SpectralNormalizationConv2D`:
  power iteration on the operator itself (conv2d forward, conv2d_transpose
  back), here with circular padding so that it converges to the exact
  circular operator norm that `tfconvnorm.conv_operator_norm` returns.
- `gram_iteration_norm`: Delattre, Barthélemy, Araujo & Allauzen (ICML 2023),
  rescaled Gram iteration on the per-frequency matrices: an upper bound that
  tightens doubly exponentially with the number of iterations.
"""

import math

import numpy as np
import tensorflow as tf

import tfconvnorm

# Defaults of the tools being imitated.
DEFAULT_POWER_ITERATIONS = 10   # the benchmark's budget for both power iterations
DEFAULT_GRAM_ITERATIONS = 6     # the default run of Delattre et al.'s lip4conv code
_SEED = 0


def _pair(value, name):
    """An int or a length-2 sequence -> a tuple of two ints."""
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"`{name}` must be an int or a pair of ints, got {value!r}.")
    return value


def _kernel_2d(kernel, name="kernel"):
    kernel = tf.convert_to_tensor(kernel)
    if kernel.shape.rank != 4:
        raise ValueError(f"`{name}` must be a 2-D conv kernel (kh, kw, c_in, c_out), "
                         f"got shape {tuple(kernel.shape)}.")
    if kernel.dtype not in (tf.float32, tf.float64):
        raise ValueError(f"`{name}` must be float32 or float64, got {kernel.dtype.name}.")
    return kernel


def _complex_dtype(dtype):
    return tf.complex128 if dtype == tf.float64 else tf.complex64


def published_tf_transforms(kernel, input_shape):
    """(n1, n2, c_in, c_out) DFT coefficients of the zero-padded kernel, as published
    (the first half of `published_tf_singular_values`)."""
    kernel = _kernel_2d(kernel)
    n1, n2 = _pair(input_shape, "input_shape")
    kh, kw = kernel.shape[0], kernel.shape[1]
    if kh > n1 or kw > n2:
        raise ValueError(f"The published method needs the kernel ({kh}x{kw}) to fit the "
                         f"input ({n1}x{n2}).")
    # fft2d transforms the two innermost axes, hence the transposes.
    conv_tr = tf.cast(tf.transpose(kernel, perm=[2, 3, 0, 1]), _complex_dtype(kernel.dtype))
    padded = tf.pad(conv_tr, [[0, 0], [0, 0], [0, n1 - kh], [0, n2 - kw]])
    return tf.transpose(tf.signal.fft2d(padded), perm=[2, 3, 0, 1])


def published_tf_singular_values(kernel, input_shape):
    """The published singular values, in TF: shape (n1, n2, min(c_in, c_out)), unsorted.

    Strides are ignored (the published code did), so for a strided layer these
    are the singular values of the unstrided convolution.
    """
    return tf.linalg.svd(published_tf_transforms(kernel, input_shape), compute_uv=False)


def published_tf_clip(kernel, input_shape, max_norm):
    """The published projection in TF: FFT, full SVD with U and V, clip, inverse FFT, truncate.

    Returns the clipped kernel (same shape and dtype). This is the single
    clip-then-truncate step of the paper; its result may still exceed max_norm.
    """
    if not (math.isfinite(float(max_norm)) and float(max_norm) > 0):
        raise ValueError(f"`max_norm` must be a positive finite number, got {max_norm!r}.")
    kernel = _kernel_2d(kernel)
    transforms = published_tf_transforms(kernel, input_shape)
    s, u, v = tf.linalg.svd(transforms, full_matrices=False)
    s_clipped = tf.cast(tf.minimum(s, tf.cast(max_norm, s.dtype)), transforms.dtype)
    clipped = tf.matmul(u * s_clipped[..., None, :], v, adjoint_b=True)
    padded = tf.math.real(tf.signal.ifft2d(tf.transpose(clipped, perm=[2, 3, 0, 1])))
    return tf.slice(tf.transpose(padded, perm=[2, 3, 0, 1]), [0, 0, 0, 0], kernel.shape)


def reshaped_kernel_power_iteration(kernel, iterations=DEFAULT_POWER_ITERATIONS, seed=_SEED):
    """sigma of the kernel reshaped to (-1, c_out), as `keras.layers.SpectralNormalization`.

    Same update order and normalisation as Keras (u in the output space).
    """
    if iterations < 1:
        raise ValueError(f"`iterations` must be >= 1, got {iterations!r}.")
    kernel = tf.convert_to_tensor(kernel)
    weights = tf.reshape(kernel, [-1, kernel.shape[-1]])
    u = tf.random.stateless_normal([1, kernel.shape[-1]], seed=[seed, 0], dtype=kernel.dtype)
    for _ in range(int(iterations)):
        v = tf.math.l2_normalize(tf.matmul(u, weights, transpose_b=True), axis=None)
        u = tf.math.l2_normalize(tf.matmul(v, weights), axis=None)
    return tf.reshape(tf.matmul(tf.matmul(v, weights), u, transpose_b=True), [])


def _wrap_pad(x, axis, extra):
    """Appends the first `extra` entries along `axis` (cyclically, even if extra > n)."""
    if extra == 0:
        return x
    n = x.shape[axis]
    reps = 1 + -(-extra // n)
    multiples = [1] * x.shape.rank
    multiples[axis] = reps
    tiled = tf.tile(x, multiples)
    begin = [0] * x.shape.rank
    size = list(x.shape)
    size[axis] = n + extra
    return tf.slice(tiled, begin, size)


def _wrap_fold(y, axis, n):
    """Adjoint of `_wrap_pad`: adds the wrapped tail back onto the first entries."""
    total = y.shape[axis]
    if total == n:
        return y
    reps = -(-total // n)
    paddings = [[0, 0]] * y.shape.rank
    paddings[axis] = [0, reps * n - total]
    y = tf.pad(y, paddings)
    shape = list(y.shape)
    shape[axis:axis + 1] = [reps, n]
    return tf.reduce_sum(tf.reshape(y, shape), axis=axis)


def _circular_geometry(kernel, input_shape, strides, dilation_rate):
    n = _pair(input_shape, "input_shape")
    s = _pair(strides, "strides")
    d = _pair(dilation_rate, "dilation_rate")
    for size, stride in zip(n, s):
        if size % stride:
            raise ValueError(f"`strides` {s} must divide `input_shape` {n}.")
    extra = tuple(di * (ki - 1) for di, ki in zip(d, kernel.shape[:2]))
    return n, s, d, extra


def _dilate(kernel, dilation):
    """The kernel with (d - 1) zeros between taps: TF's CPU conv2d_transpose has no
    dilation, and conv2d none together with strides."""
    if dilation == (1, 1):
        return kernel
    kh, kw, c_in, c_out = kernel.shape
    dense = tf.zeros([(kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1, c_in, c_out],
                     kernel.dtype)
    rows, cols = tf.meshgrid(tf.range(kh) * dilation[0], tf.range(kw) * dilation[1],
                             indexing="ij")
    return tf.tensor_scatter_nd_update(dense, tf.stack([rows, cols], -1), kernel)


def circular_conv2d(x, kernel, strides=1, dilation_rate=1):
    """Circular (periodic) 2-D convolution of x (batch, n1, n2, c_in), as conv2d 'VALID' on a
    wrap-padded input. Output (batch, n1 / s1, n2 / s2, c_out)."""
    kernel = _kernel_2d(kernel)
    n, s, d, extra = _circular_geometry(kernel, x.shape[1:3], strides, dilation_rate)
    padded = _wrap_pad(_wrap_pad(x, 1, extra[0]), 2, extra[1])
    return tf.nn.conv2d(padded, _dilate(kernel, d), strides=[1, *s, 1], padding="VALID")


def circular_conv2d_transpose(y, kernel, input_shape, strides=1, dilation_rate=1):
    """Adjoint of `circular_conv2d` for an input of spatial size `input_shape`."""
    kernel = _kernel_2d(kernel)
    n, s, d, extra = _circular_geometry(kernel, input_shape, strides, dilation_rate)
    out_shape = [y.shape[0], n[0] + extra[0], n[1] + extra[1], kernel.shape[2]]
    x = tf.nn.conv2d_transpose(y, _dilate(kernel, d), out_shape, strides=[1, *s, 1],
                               padding="VALID")
    return _wrap_fold(_wrap_fold(x, 1, n[0]), 2, n[1])


def operator_power_iteration(kernel, input_shape, strides=1, dilation_rate=1,
                             iterations=DEFAULT_POWER_ITERATIONS, seed=_SEED):
    """Operator-norm estimate by power iteration on the circular convolution itself.

    Mirrors TF Model Garden's `SpectralNormalizationConv2D.update_weights`:
    each iteration is one conv2d_transpose (u -> v, input space) and one
    conv2d (v -> u, output space); sigma = <conv(v), u>. Always <= the exact
    norm, approaching it as iterations grow. A stride must divide the input.
    """
    kernel = _kernel_2d(kernel)
    n, _, _, _ = _circular_geometry(kernel, input_shape, strides, dilation_rate)
    forward = lambda v: circular_conv2d(v, kernel, strides, dilation_rate)
    backward = lambda u: circular_conv2d_transpose(u, kernel, n, strides, dilation_rate)
    # u lives in the output space; its shape is that of forward(input).
    out_shape = forward(tf.zeros([1, *n, kernel.shape[2]], kernel.dtype)).shape
    u = tf.math.l2_normalize(
        tf.random.stateless_normal(out_shape, seed=[seed, 0], dtype=kernel.dtype), axis=None)
    v = tf.math.l2_normalize(backward(u), axis=None)

    def step(i, u, v):
        v = tf.math.l2_normalize(backward(u), axis=None)
        u = tf.math.l2_normalize(forward(v), axis=None)
        return i + 1, u, v

    if iterations > 0:
        _, u, v = tf.while_loop(lambda i, *_: i < iterations, step,
                                (tf.constant(0), u, v))
    return tf.reduce_sum(forward(v) * u)


def _frobenius(mats):
    """Frobenius norms of a batch of (complex) matrices, real dtype."""
    squares = tf.math.square(tf.math.real(mats)) + tf.math.square(tf.math.imag(mats))
    return tf.sqrt(tf.reduce_sum(squares, axis=[-2, -1]))


def gram_iteration_norm(kernel, input_shape, strides=1, dilation_rate=1, groups=1,
                        iterations=DEFAULT_GRAM_ITERATIONS):
    """Upper bound on the operator norm by rescaled Gram iteration (Delattre et al. 2023).

    For each frequency matrix P: G_0 = P, G_{t+1} = G_t^H G_t, and
    sigma_max(P) <= ||G_t||_F ** (1 / 2**t). Each G is divided by its Frobenius
    norm before squaring (the logs of the scales are carried) so nothing
    overflows; the bound is the largest over frequencies.
    """
    if iterations < 1:
        raise ValueError(f"`iterations` must be >= 1, got {iterations!r}.")
    # Only the conjugate-symmetric half of the frequencies comes back; the
    # other half has the same norms, so the maximum is unchanged.
    mats, _ = tfconvnorm.conv_transfer_matrices(kernel, input_shape, strides=strides,
                                                dilation_rate=dilation_rate, groups=groups)
    real_dtype = mats.dtype.real_dtype
    # The first Gram product on the smaller side; later ones are Hermitian squares.
    rows, cols = mats.shape[-2], mats.shape[-1]
    log_scale = tf.zeros(tf.shape(mats)[:-2], real_dtype)
    gram = mats
    for t in range(iterations):
        norm = _frobenius(gram)
        norm = tf.where(norm > 0, norm, tf.ones_like(norm))  # an all-zero matrix stays zero
        gram = gram / tf.cast(norm[..., None, None], gram.dtype)
        if t == 0 and rows < cols:
            gram = tf.matmul(gram, gram, adjoint_b=True)
        else:
            gram = tf.matmul(gram, gram, adjoint_a=True)
        log_scale = 2.0 * (log_scale + tf.math.log(norm))
    frob = _frobenius(gram)
    exponent = 2.0 ** -iterations
    bounds = tf.pow(frob, exponent) * tf.exp(log_scale * exponent)
    return tf.reduce_max(bounds)
