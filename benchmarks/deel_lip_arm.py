"""deel-lip's own Lipschitz ConvNet on the digits split of
`benchmarks.certified_robustness`, for its table. deel-lip 1.5 needs
TensorFlow <= 2.15 (Keras 2), which tfconvnorm does not support, so this runs in
a venv of its own and imports nothing of tfconvnorm:

  python -m benchmarks.certified_robustness --save_data /tmp/digits.npz ...
  python3 -m venv /tmp/venv-deel && /tmp/venv-deel/bin/pip install deel-lip==1.5.0 \\
      tensorflow==2.15.1 scikit-learn
  /tmp/venv-deel/bin/python -m benchmarks.deel_lip_arm --data /tmp/digits.npz --json OUT

The architecture mirrors the other arms (per width a 3x3 conv and a 3x3
stride-2 conv, Flatten, Dense) in deel-lip's layers (SpectralConv2D,
SpectralDense: reshaped-kernel spectral normalisation with Bjorck
orthonormalisation and deel-lip's correction factor for convolutions),
GroupSort2 activations, trained with deel-lip's TauCategoricalCrossentropy
(tau = the other arms' logit scale). Certificate: deel-lip's claim that the
network is 1-Lipschitz (margin / sqrt(2)); the same PGD and empirical lower
bounds as the other arms (`benchmarks.attacks`).
"""

import argparse
import json
import time

import numpy as np
import tensorflow as tf

from benchmarks.attacks import PGD_RESTARTS, PGD_STEPS, pgd_l2

EPS = (0.1, 0.25, 0.5)


def build(widths=(16, 32)):
    from deel.lip.activations import GroupSort2  # pylint: disable=import-outside-toplevel
    from deel.lip.layers import SpectralConv2D, SpectralDense  # pylint: disable=import-outside-toplevel
    from deel.lip.model import Sequential  # pylint: disable=import-outside-toplevel
    layers = [tf.keras.layers.InputLayer((32, 32, 1))]
    for width in widths:
        layers += [SpectralConv2D(width, (3, 3), padding="same"), GroupSort2(),
                   SpectralConv2D(width, (3, 3), strides=2, padding="same"), GroupSort2()]
    layers += [tf.keras.layers.Flatten(), SpectralDense(10)]
    return Sequential(layers, k_coef_lip=1.0)


def pair_lower_bound(model, x, found, broken, logits):
    if not broken.any():
        return 0.0
    moved = model(found[broken], training=False).numpy() - logits[broken]
    return float((np.linalg.norm(moved, axis=1) / np.linalg.norm(
        (found[broken] - x[broken]).reshape(broken.sum(), -1), axis=1)).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--json", default=None)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--tau", type=float, default=10.0)
    args = parser.parse_args()
    import deel.lip  # pylint: disable=import-outside-toplevel
    from deel.lip.losses import TauCategoricalCrossentropy  # pylint: disable=import-outside-toplevel
    data = np.load(args.data)
    x_train, y_train, x_test, y_test = (data[k] for k in ("x_train", "y_train", "x_test",
                                                          "y_test"))
    tf.keras.utils.set_random_seed(0)
    model = build()
    model.compile(tf.keras.optimizers.Adam(1e-3), TauCategoricalCrossentropy(args.tau))
    start = time.time()
    model.fit(x_train, tf.one_hot(y_train, 10), batch_size=64, epochs=args.epochs, verbose=0)
    seconds = time.time() - start
    plain = model.vanilla_export()
    logits = plain(x_test, training=False).numpy()
    predicted = np.argmax(logits, axis=1)
    top2 = np.sort(logits, axis=1)[:, -2:]
    radius = (top2[:, 1] - top2[:, 0]) / np.sqrt(2.0)
    row = dict(clean_accuracy=float(np.mean(predicted == y_test)), certificate=1.0,
               certified_accuracy={eps: float(np.mean((predicted == y_test) & (radius >= eps)))
                                   for eps in EPS},
               train_time_s=seconds, deel_lip=getattr(deel.lip, "__version__", "1.5"),
               tensorflow=tf.__version__)
    robust, lower = {}, 0.0
    for eps in EPS:
        broken, found = pgd_l2(plain, x_test, y_test, eps)
        robust[eps] = float(np.mean(~broken))
        lower = max(lower, pair_lower_bound(plain, x_test, found, broken, logits))
    # Jacobian norms at test points (power iteration), as empirical_lower_bound does.
    x = tf.constant(x_test[:64])
    v = tf.random.normal(x.shape, seed=0)
    for _ in range(50):
        with tf.autodiff.ForwardAccumulator(x, v) as accumulator:
            y = plain(x, training=False)
        jv = accumulator.jvp(y)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = plain(x, training=False)
        jtjv = tape.gradient(y, x, output_gradients=jv)
        norms = tf.sqrt(tf.reduce_sum(jtjv ** 2, axis=[1, 2, 3], keepdims=True))
        v = jtjv / tf.maximum(norms, 1e-12)
        lower = max(lower, float(tf.reduce_max(tf.sqrt(tf.norm(tf.reshape(jtjv, (64, -1)),
                                                                axis=1)))))
    row.update(pgd_robust_accuracy=robust, empirical_lower_bound=lower,
               certificate_over_empirical=1.0 / lower if lower else None,
               pgd_steps=PGD_STEPS, pgd_restarts=PGD_RESTARTS)
    text = json.dumps({"deel_lip_convnet": row}, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
