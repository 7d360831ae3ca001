"""Attacks for the robustness benchmarks: plain TensorFlow and NumPy, no
tfconvnorm import, so that other venvs (deel-lip's TensorFlow 2.15) run the
same attack."""

import numpy as np
import tensorflow as tf

PGD_STEPS = 50
PGD_RESTARTS = 3


def pgd_l2(model, x, y, eps, steps=PGD_STEPS, restarts=PGD_RESTARTS, seed=0):
    """(broken per example, the adversarial points found): margin-loss PGD in l2."""
    rng = np.random.default_rng(seed)
    broken = np.zeros(len(x), bool)
    found = np.array(x, copy=True)
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    for restart in range(restarts):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        radius = eps * rng.uniform(0, 1, (len(x), 1, 1, 1)) if restart else 0.0
        delta = noise / np.linalg.norm(flat(noise), axis=1).reshape(-1, 1, 1, 1) * radius
        for _ in range(steps):
            d = tf.Variable(delta.astype(np.float32))
            with tf.GradientTape() as tape:
                logits = model(x + d, training=False)
                true = tf.gather(logits, y, batch_dims=1)
                other = tf.reduce_max(logits - 1e9 * tf.one_hot(y, logits.shape[-1]), axis=1)
                loss = tf.reduce_sum(other - true)
            grad = tape.gradient(loss, d).numpy()
            norm = np.maximum(np.linalg.norm(flat(grad), axis=1), 1e-12).reshape(-1, 1, 1, 1)
            delta = delta + (2.5 * eps / steps) * grad / norm
            size = np.maximum(np.linalg.norm(flat(delta), axis=1), 1e-12).reshape(-1, 1, 1, 1)
            delta = delta * np.minimum(1.0, eps / size)
            wrong = np.argmax(model(x + delta, training=False).numpy(), axis=1) != y
            new = wrong & ~broken
            found[new] = (x + delta)[new]
            broken |= wrong
    return broken, found


