"""Certified robustness from a certified Lipschitz bound: radii and accuracy.

If a model's outputs f are L-Lipschitz in l2 (`lipschitz_bound`, inference
mode), every difference of two outputs f_i - f_j is sqrt(2) L-Lipschitz
(||e_i - e_j||_2 = sqrt(2)), so the top class at x cannot change within the
l2 radius margin(x) / (sqrt(2) L), margin = top output - runner-up (Tsuzuku,
Sato & Sugiyama 2018). The margin is taken from the outputs as the model
computes them (in float64 from its dtype); the radius is the function's
certificate, not a bound on the floating-point rounding of the forward pass.

Works on models of every Keras backend (the forward passes are Keras'; the
Lipschitz bound is `lipschitz_bound`'s).
"""

import math

import keras
import numpy as np

from tfconvnorm import lipschitz as lipschitz_lib
from tfconvnorm.spectral.arguments import check_positive, check_positive_int

DEFAULT_BATCH_SIZE = 256


def _lipschitz(model, lipschitz):
    if lipschitz is None:
        return float(lipschitz_lib.lipschitz_bound(model))
    return check_positive(lipschitz, "lipschitz")


def _outputs(model, x, batch_size):
    """The model's outputs in inference mode, float64, shape (n, classes)."""
    chunks = []
    for start in range(0, len(x), batch_size):
        out = keras.ops.convert_to_numpy(model(x[start:start + batch_size], training=False))
        chunks.append(np.asarray(out, np.float64))
    outputs = np.concatenate(chunks) if chunks else np.zeros((0, 2))
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        raise ValueError(f"model '{model.name}' must output (batch, classes) scores with at "
                         f"least 2 classes; it gave shape {outputs.shape}.")
    return outputs


def _radii_and_predictions(outputs, lipschitz):
    top2 = np.sort(outputs, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    return margin / (math.sqrt(2.0) * lipschitz), np.argmax(outputs, axis=1)


def _check_inputs(x, argument="x"):
    if not hasattr(x, "shape") or len(x.shape) < 2:
        raise ValueError(f"`{argument}` must be a batch of inputs (an array with a batch "
                         f"axis); received {argument} of type {type(x).__name__}"
                         f"{'' if not hasattr(x, 'shape') else ' and shape ' + str(x.shape)}.")
    return x


def certified_radius(model, x, lipschitz=None, batch_size=DEFAULT_BATCH_SIZE):
    """Per example, the l2 radius within which the model's top class is certified.

    Args:
      model: a Keras model whose outputs are per-class scores (logits or
        probabilities: the certificate is about what it outputs).
      x: a batch of inputs (array or tensor), as the model takes them.
      lipschitz: the model's l2 Lipschitz constant; None computes the
        certified `lipschitz_bound(model)` (a constant given here is the
        caller's claim: the radii are certified only if it holds).
      batch_size: examples per forward pass.

    Returns:
      float64 array of shape (n,): margin / (sqrt(2) * lipschitz), 0 where the
      top two scores tie.
    """
    lipschitz = _lipschitz(model, lipschitz)
    batch_size = check_positive_int(batch_size, "batch_size")
    x = _check_inputs(x)
    return _radii_and_predictions(_outputs(model, x, batch_size), lipschitz)[0]


def _labels(y, n, classes):
    y = np.asarray(keras.ops.convert_to_numpy(y))
    if y.ndim == 2 and y.shape[1] == classes:  # one-hot
        y = np.argmax(y, axis=1)
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"labels must be class indices of shape ({n},) or one-hot of shape "
                         f"({n}, {classes}); received shape {y.shape}.")
    return y.astype(np.int64)


def _batches(data):
    """(x, y) pairs from arrays or from a dataset / iterable of (x, y) batches."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        return [data]
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        if isinstance(data, tf.data.Dataset):
            return ((x.numpy(), y.numpy()) for x, y in data)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(data, (list, tuple)) or hasattr(data, "__iter__"):
        return data
    raise ValueError(f"`data` must be an (x, y) pair of arrays or a dataset of (x, y) "
                     f"batches; received {type(data).__name__}.")


def certified_accuracy(model, data, eps, lipschitz=None, batch_size=DEFAULT_BATCH_SIZE):
    """The share of examples classified correctly with a certified radius >= eps.

    Args:
      model, lipschitz, batch_size: as for `certified_radius` (the Lipschitz
        bound is computed once).
      data: an (x, y) pair of arrays, or a `tf.data.Dataset` (or iterable) of
        (x, y) batches; y holds class indices or one-hot rows.
      eps: an l2 radius >= 0, or a sequence of them.

    Returns:
      A float in [0, 1] for one eps; `{eps: accuracy}` for a sequence. At
      eps = 0 it is the clean accuracy.
    """
    many = isinstance(eps, (list, tuple, np.ndarray))
    radii_asked = list(eps) if many else [eps]
    if not radii_asked:
        raise ValueError("`eps` is empty; give an l2 radius >= 0 or a sequence of them.")
    radii_asked = [check_positive(e, "eps", allow_zero=True) for e in radii_asked]
    lipschitz = _lipschitz(model, lipschitz)
    batch_size = check_positive_int(batch_size, "batch_size")
    correct_radii, total = [], 0
    for x, y in _batches(data):
        x = _check_inputs(x, "data's inputs")
        outputs = _outputs(model, x, batch_size)
        radii, predicted = _radii_and_predictions(outputs, lipschitz)
        labels = _labels(y, len(outputs), outputs.shape[1])
        correct_radii.append(np.where(predicted == labels, radii, -np.inf))
        total += len(outputs)
    if total == 0:
        raise ValueError("`data` holds no examples.")
    correct_radii = np.concatenate(correct_radii)
    accuracies = {e: float(np.mean(correct_radii >= e)) for e in radii_asked}
    return accuracies if many else accuracies[radii_asked[0]]
