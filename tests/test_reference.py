"""The oracle itself: the explicit matrix must be the operator Keras layers apply."""

import numpy as np
import pytest
import tensorflow as tf

from tfconvnorm import reference


def _circular_conv(x, kernel, strides, dilation, groups):
    """tf.nn.convolution on an input padded by wrapping, so 'VALID' = circular.

    Strides are applied by subsampling a stride-1 result (TF refuses strides
    together with dilation), which is what a strided convolution is."""
    rank = kernel.ndim - 2
    pads = [(0, (k - 1) * d) for k, d in zip(kernel.shape[:rank], dilation)]
    padded = np.pad(x, [(0, 0)] + pads + [(0, 0)], mode="wrap")
    if groups == 1:
        out = tf.nn.convolution(padded, kernel, dilations=dilation,
                                padding="VALID")
    else:  # TF's grouped conv only runs on GPU; split by hand.
        c_in_group = kernel.shape[-2]
        c_out_group = kernel.shape[-1] // groups
        out = tf.concat([
            tf.nn.convolution(padded[..., g * c_in_group:(g + 1) * c_in_group],
                              kernel[..., g * c_out_group:(g + 1) * c_out_group],
                              dilations=dilation, padding="VALID")
            for g in range(groups)], axis=-1)
    return out.numpy()[(slice(None),) + tuple(slice(None, None, s) for s in strides)]


@pytest.mark.parametrize("shape,n,strides,dilation,groups", [
    ((3, 3, 2, 3), (5, 6), (1, 1), (1, 1), 1),
    ((3, 3, 2, 4), (6, 6), (2, 2), (1, 1), 1),
    ((3, 3, 2, 4), (8, 8), (2, 1), (2, 1), 1),
    ((3, 2, 3), (9,), (3,), (1,), 1),
    ((2, 2, 2, 2, 2), (4, 4, 4), (2, 2, 2), (1, 1, 1), 1),
    ((3, 3, 2, 6), (6, 6), (1, 1), (1, 1), 3),
])
def test_explicit_matrix_is_circular_keras_convolution(shape, n, strides, dilation, groups):
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal(shape)
    c_in = shape[-2] * groups
    matrix = reference.explicit_operator_matrix(kernel, n, strides, dilation, groups)
    for _ in range(3):
        x = rng.standard_normal((1,) + tuple(n) + (c_in,))
        expected = _circular_conv(x, kernel, strides, dilation, groups)
        np.testing.assert_allclose(matrix @ x.ravel(), expected.ravel(), rtol=1e-10,
                                   atol=1e-10)


def test_dense_matrix_is_x_times_kernel():
    kernel = np.arange(6.0).reshape(2, 3)
    x = np.array([1.0, -2.0])
    np.testing.assert_allclose(reference.explicit_operator_matrix(kernel, ()) @ x, x @ kernel)


def test_published_methods_shapes():
    kernel = np.random.default_rng(1).standard_normal((3, 3, 4, 5))
    assert reference.published_singular_values(kernel, (8, 8)).shape == (8, 8, 4)
    assert reference.published_clip(kernel, (8, 8), 1.0).shape == kernel.shape


def test_explicit_matrix_refuses_huge_sizes():
    with pytest.raises(ValueError, match="too large"):
        reference.explicit_operator_matrix(np.ones((3, 3, 64, 64)), (64, 64))
