"""BatchNormalization statistics re-estimated on training batches ("precise BN").

After a projection of the convs, Keras' running averages lag behind the weights
for hundreds of steps; `recalibrate_batch_norm` replaces them by averages of
batch statistics, and `PreciseBatchNorm` does that before every validation in
`fit`. Every Keras backend: a `tf.function` over the model under TensorFlow,
`jax.jit` of its stateless call under JAX, eager calls under PyTorch.
"""

import weakref

import keras
import numpy as np
import tensorflow as tf

from tfconvnorm import _compat
from tfconvnorm.spectral.arguments import check_positive_int

DEFAULT_BATCH_NORM_BATCHES = 20
# {model: (its BN layers, compiled batch-statistics function)}.
_BATCH_STATISTICS = weakref.WeakKeyDictionary()


def recalibrate_batch_norm(model, dataset, num_batches):
    """Re-estimates every BatchNormalization layer's moving statistics ("precise BN").

    The moving averages lag behind the weights: a projection changes the convs
    at once, and the mismatch compounds through the network's BN layers in
    inference mode. Training itself uses batch statistics, so this changes
    nothing but evaluation: each layer's moving mean and variance become the
    averages of its batch statistics over `num_batches` batches of `dataset`
    (Wu & Johnson 2021, "Rethinking Batch in BatchNorm", PreciseBN).

    `dataset` is a tf.data.Dataset of (inputs, labels) batches (cycled from its
    start) or an iterator over such batches (continued where it stands).

    Returns:
      The number of batches used (0 when the model has no BN layer).
    """
    layers = [l for l in _compat.flatten_layers(model)
              if isinstance(l, keras.layers.BatchNormalization)]
    if not layers or num_batches < 1:
        return 0
    momenta = [l.momentum for l in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # each call leaves exactly that batch's statistics
        cached = _BATCH_STATISTICS.get(model)
        if cached is None or cached[0] != layers:
            cached = _BATCH_STATISTICS[model] = (layers, _batch_statistics_fn(model, layers))
        batch_statistics = cached[1]

        sums, count = None, 0
        batches = (dataset.repeat().take(num_batches) if isinstance(dataset, tf.data.Dataset)
                   else (next(dataset) for _ in range(num_batches)))
        for images, _ in batches:
            stats = [(np.asarray(keras.ops.convert_to_numpy(m), np.float64),
                      np.asarray(keras.ops.convert_to_numpy(v), np.float64))
                     for m, v in batch_statistics(images)]
            sums = stats if sums is None else [
                (sm + m, sv + v) for (sm, sv), (m, v) in zip(sums, stats)]
            count += 1
        for layer, (mean_sum, var_sum) in zip(layers, sums):
            layer.moving_mean.assign(mean_sum / count)
            layer.moving_variance.assign(var_sum / count)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return count


def _batch_statistics_fn(model, layers):
    """images -> [(moving_mean, moving_variance)] of `layers` after one forward
    pass in training mode (momentum 0: that batch's statistics).

    Compiled once per model (momentum 0 is a constant of the trace): a
    clipper that re-estimates after every projection must not retrace each
    time. TensorFlow: a `tf.function`; JAX: `jit` of the model's stateless
    call (the moving statistics are among its non-trainable variables);
    PyTorch: eager calls without autograd.
    """
    model_ref = weakref.ref(model)  # the cache must not keep the model alive
    backend = keras.backend.backend()
    if backend == "tensorflow":
        @tf.function
        def batch_statistics(images):
            model_ref()(images, training=True)
            return [(l.moving_mean.value, l.moving_variance.value) for l in layers]
        return batch_statistics
    if backend == "jax":
        import jax  # pylint: disable=import-outside-toplevel
        index = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        wanted = [(index[id(l.moving_mean)], index[id(l.moving_variance)]) for l in layers]

        @jax.jit
        def stateless(trainable, non_trainable, images):
            _, new = model_ref().stateless_call(trainable, non_trainable, images, training=True)
            return [(new[m], new[v]) for m, v in wanted]

        def batch_statistics(images):
            m = model_ref()
            return stateless([v.value for v in m.trainable_variables],
                             [v.value for v in m.non_trainable_variables],
                             keras.ops.convert_to_numpy(images))
        return batch_statistics

    def batch_statistics(images):
        import torch  # pylint: disable=import-outside-toplevel
        with torch.no_grad():
            model_ref()(keras.ops.convert_to_tensor(keras.ops.convert_to_numpy(images)),
                        training=True)
        return [(l.moving_mean.value, l.moving_variance.value) for l in layers]
    return batch_statistics


class PreciseBatchNorm(keras.callbacks.Callback):
    """Re-estimates the BN statistics (`recalibrate_batch_norm`) before every
    validation in `fit`, so that per-epoch validation measures the weights as
    they are, not running averages that lag behind them.

    The lag is worst with few steps per epoch and after each projection of
    `OperatorNormClipper`: a projection shrinks the convs at once (and with
    them BN's effective learning rate grows), and validation with Keras'
    running averages can sit at chance for epochs while training is fine.
    Training never uses the running averages, so only evaluation changes.
    Costs `num_batches` forward passes per validation.

    Args:
      dataset: (inputs, labels) batches of training data (a tf.data.Dataset).
      num_batches: batches per re-estimation (an integer >= 1).
    """

    def __init__(self, dataset, num_batches=DEFAULT_BATCH_NORM_BATCHES):
        super().__init__()
        self.dataset = check_batch_norm_data(dataset, "dataset", allow_none=False)
        self.num_batches = check_positive_int(num_batches, "num_batches")
        self._iterator = None

    def on_test_begin(self, logs=None):
        # One iterator for the whole run: a new one per validation would refill
        # the dataset's shuffle buffer each time, which costs more than the passes.
        if self._iterator is None:
            self._iterator = iter(self.dataset.repeat())
        recalibrate_batch_norm(self.model, self._iterator, self.num_batches)


def check_batch_norm_data(value, argument, allow_none=True):
    if (value is None and allow_none) or isinstance(value, tf.data.Dataset):
        return value
    raise TypeError(f"{argument} must be a tf.data.Dataset of (inputs, labels) batches"
                    f"{' or None' if allow_none else ''}, got {type(value).__name__}")
