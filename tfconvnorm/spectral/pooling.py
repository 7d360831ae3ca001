"""Pooling: one decomposition call per matrix shape, however many layers.

Kernels of one shape, dtype and geometry are stacked into one grouped
convolution (`Stack`); per-frequency matrices of different layers (and
different geometries) that share (rows, cols, dtype) are concatenated along
the batch axis and decomposed by one op. On a network of small layers, op
launches otherwise cost more than the arithmetic.
"""

import numpy as np
import tensorflow as tf

from tfconvnorm.spectral import padding as padding_lib
from tfconvnorm.spectral.linalg import (clip_matrices, largest_singular_values,
                                        matrix_singular_values, safe_scale)
from tfconvnorm.spectral.operator import Geometry, prepare_kernel, work_dtypes
from tfconvnorm.spectral.transforms import forward, forward_parts


def _pools(keys):
    """{key: indices of the entries with that key}, in first-seen order."""
    pools = {}
    for index, key in enumerate(keys):
        pools.setdefault(key, []).append(index)
    return pools


def _size_key(matrices):
    """What matrices must share to be decomposed together: size and dtype."""
    return tuple(matrices.shape[-2:]), matrices.dtype


def _unflatten(values, pool, shapes, results):
    """Split pooled per-matrix `values` back into results[index], shaped like
    each entry's matrices (freqs, batch) plus `values`' trailing axes."""
    sizes = [int(np.prod(shape[:2])) for shape in shapes]
    for index, shape, part in zip(pool, shapes, _split(values, sizes)):
        results[index] = tf.reshape(part, tuple(shape[:2]) + tuple(values.shape[1:]))


def _concat(tensors):
    return tensors[0] if len(tensors) == 1 else tf.concat(tensors, axis=0)


def _split(tensor, sizes):
    return [tensor] if len(sizes) == 1 else tf.split(tensor, sizes)


def _flat(matrices):
    return tf.reshape(matrices, (-1,) + tuple(matrices.shape[-2:]))


def _largest_singular_values_pooled(entries):
    """`largest_singular_values` of [((real, imag or None), count)], parts of shape
    (freqs, count * groups, rows, cols): one (count,) tensor per entry
    (column block b of an entry is operator b)."""
    results = [None] * len(entries)
    keys = [_size_key(parts[0]) + (parts[1] is None,) for parts, _ in entries]
    for pool in _pools(keys).values():
        segments, offset = [], 0
        for index in pool:
            (real, _), count = entries[index]
            frequencies, batch = real.shape[:2]
            segments.append(np.tile(np.repeat(np.arange(count), batch // count), frequencies)
                            + offset)
            offset += count
        values = largest_singular_values(
            _concat([_flat(entries[index][0][0]) for index in pool]),
            None if entries[pool[0]][0][1] is None else
            _concat([_flat(entries[index][0][1]) for index in pool]),
            tf.constant(np.concatenate(segments), tf.int32), offset)
        for index, value in zip(pool, _split(values, [entries[i][1] for i in pool])):
            results[index] = value
    return results


def clip_matrices_pooled(entries, with_tops=False):
    """`clip_matrices` of [(matrices (freqs, batch, rows, cols), bound broadcastable to
    (freqs, batch))]: the clipped matrices, entry by entry (with `with_tops`,
    `(clipped, tops, exact)` per entry, `tops` and `exact` of shape (freqs, batch))."""
    results = [None] * len(entries)
    tops, exact = [None] * len(entries), [None] * len(entries)
    for pool in _pools([_size_key(matrices) for matrices, _ in entries]).values():
        flat = _concat([_flat(entries[index][0]) for index in pool])
        bound = _concat([tf.reshape(tf.broadcast_to(tf.cast(bound, matrices.dtype.real_dtype),
                                                    matrices.shape[:2]), [-1])
                         for matrices, bound in (entries[index] for index in pool)])
        shapes = [entries[index][0].shape for index in pool]
        if with_tops:
            clipped, top, is_exact = clip_matrices(flat, bound, with_tops=True)
            _unflatten(top, pool, shapes, tops)
            _unflatten(is_exact, pool, shapes, exact)
        else:
            clipped = clip_matrices(flat, bound)
        _unflatten(clipped, pool, shapes, results)
    return list(zip(results, tops, exact)) if with_tops else results


def singular_values_pooled(entries):
    """`matrix_singular_values` of [(real, imag or None, use_svd)], float64
    parts of shape (freqs, batch, rows, cols): one (freqs, batch, k) float64
    tensor per entry."""
    results = [None] * len(entries)
    keys = [(tuple(real.shape[-2:]), imag is None, use_svd) for real, imag, use_svd in entries]
    for (_, is_real, use_svd), pool in _pools(keys).items():
        real = _concat([_flat(entries[index][0]) for index in pool])
        imag = None if is_real else _concat([_flat(entries[index][1]) for index in pool])
        _unflatten(matrix_singular_values(real, imag, use_svd=use_svd), pool,
                   [entries[index][0].shape for index in pool], results)
    return results


_GEOMETRY_KEYS = ("input_shape", "strides", "dilation_rate", "groups", "padding")


class _Stack:
    """Kernels of one shape, dtype and geometry, concatenated along c_out.

    Several same-geometry kernels side by side are one grouped convolution
    with `groups * count` groups: its operator is block diagonal over them,
    so one pass over the stacked kernel does every kernel's work with a
    fraction of the op launches. `indices` are the kernels' positions in the
    caller's list; `layer` is one kernel's own `Geometry` (its padding, and
    the layer's singular-value count), `geometry` the stacked circular one.
    """

    def __init__(self, indices, kernels, geometry):
        self.indices = indices
        self.count = len(kernels)
        self.c_out = int(kernels[0].shape[-1])
        self.stacked = tf.concat(kernels, axis=-1) if len(kernels) > 1 else kernels[0]
        self.out_dtype = self.stacked.dtype
        self.real_dtype, self.complex_dtype = work_dtypes(self.out_dtype)
        self.geometry = Geometry(self.stacked.shape, geometry.input_shape, geometry.strides,
                                  geometry.dilation_rate, geometry.groups * len(kernels))
        self.groups_per_kernel = geometry.groups
        self.layer = geometry

    def forward(self, stacked):
        return forward(stacked, self.geometry, self.complex_dtype)

    def per_channel(self, values):
        """(count,) -> broadcastable over the stacked kernel's last axis."""
        return tf.repeat(values, self.c_out)

    def unstack(self, stacked):
        """(*shape[:-1], count * c_out) -> [count kernels of shape (*shape[:-1], c_out)]."""
        return [stacked] if self.count == 1 else tf.split(stacked, self.count, axis=-1)


def _geometry_kwargs(geometry, index):
    """A `geometries` entry as keyword arguments of `Geometry`."""
    if hasattr(geometry, "spectral_kwargs"):
        geometry = geometry.spectral_kwargs()
    unknown = sorted(set(geometry) - set(_GEOMETRY_KEYS)) if isinstance(geometry, dict) else []
    if not isinstance(geometry, dict) or "input_shape" not in geometry or unknown:
        raise ValueError(
            f"geometries[{index}] must be a dict with key 'input_shape' and optionally "
            f"'strides', 'dilation_rate', 'groups', 'padding' (the keyword arguments of "
            f"conv_singular_values), got geometries[{index}]={geometry!r}"
            + (f" (unknown keys {unknown})" if unknown else ""))
    return dict(dict(strides=1, dilation_rate=1, groups=1, padding=padding_lib.CIRCULAR),
                **geometry)


def check_list(name, value):
    """`value` (one entry per kernel) as a list; a single tensor or dict is refused."""
    if tf.is_tensor(value) or isinstance(value, (np.ndarray, dict, str)):
        raise TypeError(f"{name} must be a list (one entry per kernel), got a "
                        f"{type(value).__name__}")
    return list(value)


def plan(kernels, geometries):
    """Validate `kernels` / `geometries` and stack the kernels that share shape,
    dtype and geometry. Returns (number of kernels, [_Stack])."""
    kernels, geometries = check_list("kernels", kernels), check_list("geometries", geometries)
    if not kernels:
        raise ValueError("kernels is empty")
    if len(kernels) != len(geometries):
        raise ValueError(f"kernels and geometries must have the same length, got "
                         f"{len(kernels)} kernels and {len(geometries)} geometries")
    stacks = {}
    for index, (kernel, geometry) in enumerate(zip(kernels, geometries)):
        name = "kernel" if len(kernels) == 1 else f"kernels[{index}]"
        kernel = prepare_kernel(kernel, name)
        kwargs = _geometry_kwargs(geometry, index)
        try:
            g = Geometry(kernel.shape, **kwargs)
        except ValueError as error:
            if len(kernels) == 1:
                raise
            raise ValueError(f"kernels[{index}]: {error}") from None
        key = (tuple(kernel.shape), kernel.dtype, g.layer_input_shape, g.padding, g.strides,
               g.dilation_rate, g.groups)
        entry = stacks.setdefault(key, ([], [], g))
        entry[0].append(index)
        entry[1].append(kernel)
    return len(kernels), [_Stack(indices, ks, g) for indices, ks, g in stacks.values()]


def scatter(count, stacks, per_stack):
    """Per-stack lists of per-kernel results -> one list in the caller's order."""
    out = [None] * count
    for stack, results in zip(stacks, per_stack):
        for index, result in zip(stack.indices, results):
            out[index] = result
    return out


def batch_arguments(kernels, input_shape, strides, dilation_rate, groups, padding):
    """The `*_batch` functions' arguments as `plan`'s, with their one-shape check."""
    if tf.is_tensor(kernels) or isinstance(kernels, np.ndarray):
        raise TypeError("kernels must be a list of kernels of one shape, got a single "
                        f"{type(kernels).__name__} of shape {tuple(kernels.shape)}")
    kernels = list(kernels)
    if not kernels:
        raise ValueError("kernels is empty")
    kernels = [prepare_kernel(k) for k in kernels]
    first = kernels[0]
    for index, k in enumerate(kernels):
        if k.shape != first.shape or k.dtype != first.dtype:
            raise ValueError(
                f"kernels must share one shape and dtype: kernels[0] is {first.dtype.name} "
                f"{tuple(first.shape)}, kernels[{index}] is {k.dtype.name} {tuple(k.shape)}")
    # Validate as the user wrote it, so that errors name their arguments.
    Geometry(first.shape, input_shape, strides, dilation_rate, groups, padding)
    geometry = dict(input_shape=input_shape, strides=strides, dilation_rate=dilation_rate,
                    groups=groups, padding=padding)
    return kernels, [geometry] * len(kernels)


def norms_of_stacks(stacks, stacked_kernels):
    """Per stack, the (count,) norms (working dtype) of its kernels, given stacked.

    Each kernel is divided by its largest entry first (the norm is
    positively homogeneous), so that Gram matrices and their squarings
    neither overflow nor underflow.
    """
    entries, scales = [], []
    for stack, k in zip(stacks, stacked_kernels):
        k = tf.cast(k, stack.real_dtype)
        scale = tf.reduce_max(tf.abs(tf.reshape(k, (-1, stack.count, stack.c_out))), axis=[0, 2])
        scale = tf.stop_gradient(safe_scale(scale))
        real, imag = forward_parts(k / stack.per_channel(scale), stack.geometry,
                                   stack.real_dtype)
        # Frequency-independent matrices (Dense, 1x1 convs) are real: real arithmetic.
        entries.append(((real, None if stack.geometry.real else imag), stack.count))
        scales.append(scale)
    return [norms * scale for norms, scale in
            zip(_largest_singular_values_pooled(entries), scales)]
