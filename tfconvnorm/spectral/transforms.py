"""Kernel <-> per-frequency matrices P(w), by the per-axis DFT factors of `operator`.

Internally every per-frequency matrix is stored transposed, P(w)^T, of shape
(phases * c_in / groups, c_out / groups): that is the order in which the
kernel's own axes come out of the transform, so no transpose pass over the
batch is needed (for groups == 1), and the singular values, the Gram
eigenvalues and the clipping are the same for P^T as for P.
"""

import functools

import tensorflow as tf


def forward(kernel, geometry, complex_dtype):
    """Per-frequency matrices P(w)^T, shape (frequencies, groups, cols, rows)."""
    return tf.complex(*forward_parts(kernel, geometry, complex_dtype.real_dtype))


def forward_parts(kernel, geometry, real_dtype):
    """Real and imaginary parts of `forward`'s matrices.

    Works on real and imaginary parts separately: a real kernel needs half
    the products, TF's real matmuls are several times faster than complex
    ones, and the operator norm goes on in real arithmetic (`gram_parts`).
    """
    g = geometry
    shape = (g.num_frequencies, g.groups, g.cols, g.rows)
    if g.combined is not None:
        x = tf.reshape(tf.cast(kernel, real_dtype), (g.taps, g.c_in_group, g.groups,
                                                     g.c_out_group))
        if g.groups > 1:  # groups first: a transpose of the kernel, not of the output
            x = tf.transpose(x, [0, 2, 1, 3])
        x = tf.matmul(tf.constant(g.combined[0], real_dtype), tf.reshape(x, (g.taps, -1)))
        x = tf.reshape(x, (2, g.num_frequencies, g.phases, g.groups, g.c_in_group,
                           g.c_out_group))
        if g.groups > 1 and g.phases > 1:
            x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
        x = tf.reshape(x, (2,) + shape)
        return x[0], x[1]
    real = tf.reshape(tf.cast(kernel, real_dtype), g.kernel_size + (g.c_in_group * g.c_out,))
    imag = tf.zeros_like(real)
    for f in g.factors:
        # Contract the leading tap axis; (freq, phase) axes are appended.
        f_re = tf.constant(f.forward.real, real_dtype)
        f_im = tf.constant(f.forward.imag, real_dtype)
        dot = functools.partial(tf.tensordot, axes=[[0], [2]])
        real, imag = dot(real, f_re) - dot(imag, f_im), dot(real, f_im) + dot(imag, f_re)
    d = g.rank
    freq_axes = [3 + 2 * j for j in range(d)]
    phase_axes = [4 + 2 * j for j in range(d)]

    def arrange(x):  # (c_in_group * c_out, w_1, phase_1, ..., w_d, phase_d) -> matrices
        x = tf.reshape(x, (g.c_in_group, g.groups, g.c_out_group)
                       + sum(((w, s) for w, s in zip(g.freq_shape, g.strides)), ()))
        x = tf.transpose(x, freq_axes + [1] + phase_axes + [0, 2])
        return tf.reshape(x, shape)

    return arrange(real), arrange(imag)


def inverse(matrices, geometry, real_dtype):
    """Least-squares kernel (same support) of conjugate-symmetric per-frequency
    matrices (in `forward`'s layout)."""
    g = geometry
    complex_dtype = matrices.dtype
    if g.combined is not None:
        x = tf.reshape(matrices, (g.num_frequencies, g.groups, g.phases, g.c_in_group,
                                  g.c_out_group))
        if g.groups > 1 and g.phases > 1:
            x = tf.transpose(x, [0, 2, 1, 3, 4])
        x = tf.reshape(x, (g.num_frequencies * g.phases, g.c_in_group * g.c_out))
        x = tf.concat([tf.math.real(x), tf.math.imag(x)], axis=0)
        x = tf.matmul(tf.constant(g.combined[1], x.dtype), x)
        x = tf.reshape(x, (g.taps, g.groups, g.c_in_group, g.c_out_group))
        if g.groups > 1:
            x = tf.transpose(x, [0, 2, 1, 3])
        return tf.cast(tf.reshape(x, g.kernel_size + (g.c_in_group, g.c_out)), real_dtype)
    d = g.rank
    x = tf.reshape(matrices, g.freq_shape + (g.groups,) + g.strides
                   + (g.c_in_group, g.c_out_group))
    # -> (c_in_group, groups, c_out_group, w_1, phase_1, ..., w_d, phase_d)
    perm = [2 * d + 1, d, 2 * d + 2] + sum(([j, d + 1 + j] for j in range(d)), [])
    x = tf.transpose(x, perm)
    x = tf.reshape(x, (g.c_in_group * g.c_out,)
                   + sum(((w, s) for w, s in zip(g.freq_shape, g.strides)), ()))
    for f in g.factors:
        # Contract the (freq, phase) pair after the channel axis; tap axis appended.
        x = tf.tensordot(x, tf.constant(f.inverse, complex_dtype), axes=[[1, 2], [0, 1]])
    # x: (c_in_group * c_out, k_1, ..., k_d); the imaginary part is rounding.
    x = tf.math.real(x)
    x = tf.transpose(x, list(range(1, d + 1)) + [0])
    return tf.cast(tf.reshape(x, g.kernel_size + (g.c_in_group, g.c_out)), real_dtype)
