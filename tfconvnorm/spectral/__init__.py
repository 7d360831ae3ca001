"""Exact spectra of convolution operators, and projections onto operator-norm balls.

A circular (wrap-around) convolution is block circulant, so the DFT
block-diagonalises it (Sedghi, Gupta & Long, ICLR 2019): its singular values
are those of the small matrices P(w) obtained by transforming the kernel at
every frequency w. This module generalises that to what real layers do:

* strides: a stride-s convolution is a stride-1 convolution of the s^d
  polyphase components of its input (space-to-depth), so P(w) is
  `c_out x (s^d * c_in)` on the (n/s)^d output frequencies; exact, where the
  published code ignores strides;
* dilation, and inputs smaller than the (dilated) kernel: taps land at
  `t * dilation mod n`, so taps that wrap around add up (fold) - NumPy's
  `fft2(kernel, n)` would silently crop them instead;
* groups / depthwise: the operator is block diagonal over groups, so every
  group is its own small matrix;
* 1-D, 2-D, 3-D, and rank-2 kernels with `input_shape=()` (Dense layers).

Structure used because it is exact: real kernels have P(-w) = conj(P(w)), so
only half of the frequencies are decomposed (the rest are counted twice);
kernels whose taps all fall inside one stride (1x1 convs, 2x2 stride-2
"patchify" convs) have the same matrix at every frequency, so one
decomposition serves all.

The per-frequency transform is a product of small per-axis DFT matrices
rather than a zero-padded FFT: it folds wrapped taps, handles dilation and
the polyphase split in one step, and costs O(n k) per axis, which for conv
kernels (k << n) is cheaper than O(n log n). The per-axis factors are
combined into one real matrix, so a transform is a single matmul (one
contraction per axis for very large 3-D inputs).

Whole networks: the `*_many` functions take kernels of any geometries; those
of one geometry are stacked (one grouped convolution), and the matrices of
every layer that share a size go through one decomposition op. On networks
of small layers, op launches otherwise cost more than the arithmetic.

Decompositions, and where they run: singular values of float32 kernels come
from `tf.linalg.eigvalsh` of the per-frequency Gram matrices in complex128
(real float64 where every matrix is real: 1x1 convs, Dense); eigvalsh has
CPU and GPU kernels. The few matrices whose condition number would make
that inaccurate for small singular values are redone with `tf.linalg.svd`.
float64 kernels use `tf.linalg.svd` throughout, for full relative accuracy.
TensorFlow has no GPU kernel for complex SVD, so those SVDs run on the CPU
even inside a GPU program. Operator norms and projections use `eigvalsh` /
`eigh` and matmuls only, so they run wholly on a GPU. Complex products are
done as real matmuls (TF's complex64 kernels are several times slower).

Zero padding: real layers pad with zeros, and a padded layer is a submatrix
of the circular convolution on a slightly larger size N (`padding`). Every
function takes `padding=`: "circular" (the default, the published operator)
or the layer's own ("same", "valid", "causal", explicit pads), in which case
the circular operator on N is decomposed, and its spectrum bounds the
layer's entry by entry (`bounds` adds certified lower bounds).

The training-time path (`matmul`): a certified upper bound on the operator
norm from Gram iteration, matmuls with static shapes in `keras.ops`, which
compiles under XLA; the default constraint and the regularizer use it.

The modules, in the order data flows through them: `padding` (zero-padded
layer -> circular size N), `operator` (validated geometry, per-axis DFT
factors), `transforms` (kernel <-> per-frequency matrices), `linalg`
(decompositions, bounds, the clip), `matmul` (the XLA-safe bound), `pooling` (many kernels, one op per
matrix size), and the public functions in `spectra`, `projection` and
`bounds`.

Everything here is pure TensorFlow: graph-safe (`tf.function` with static
kernel shapes), dtype-preserving, and free of Keras.
"""

from tfconvnorm.spectral.arguments import METHODS
from tfconvnorm.spectral.bounds import (
    DEFAULT_POWER_ITERATIONS,
    NormBounds,
    apply_convolution,
    conv_operator_norm_bounds,
    conv_operator_norm_bounds_many,
)
from tfconvnorm.spectral.matmul import conv_operator_norm_upper_bound
from tfconvnorm.spectral.padding import CIRCULAR, PADDING_MODES, CircularEmbedding, circular_embedding
from tfconvnorm.spectral.projection import (
    DEFAULT_METHOD,
    clip_conv_singular_values,
    clip_conv_singular_values_batch,
    clip_conv_singular_values_many,
)
from tfconvnorm.spectral.spectra import (
    conv_operator_norm,
    conv_operator_norm_batch,
    conv_operator_norm_many,
    conv_singular_values,
    conv_singular_values_batch,
    conv_singular_values_many,
    conv_transfer_matrices,
)

__all__ = [
    "CIRCULAR",
    "PADDING_MODES",
    "CircularEmbedding",
    "circular_embedding",
    "METHODS",
    "DEFAULT_METHOD",
    "conv_transfer_matrices",
    "conv_singular_values",
    "conv_operator_norm",
    "clip_conv_singular_values",
    "conv_singular_values_batch",
    "conv_operator_norm_batch",
    "clip_conv_singular_values_batch",
    "conv_singular_values_many",
    "conv_operator_norm_many",
    "clip_conv_singular_values_many",
    "DEFAULT_POWER_ITERATIONS",
    "NormBounds",
    "apply_convolution",
    "conv_operator_norm_bounds",
    "conv_operator_norm_bounds_many",
    "conv_operator_norm_upper_bound",
]
