"""Certified robustness on digits: the Lipschitz mode against SpectralNormalization
and the paper's protocol, with attacks and empirical lower bounds beside each
certificate.

  python -m benchmarks.certified_robustness --json benchmarks/recorded/certified-DATE.json

Data: scikit-learn's digits as train.py builds them (the fixed split, 32x32
bilinear upsampling), pixels scaled to [0, 1]; l2 radii eps in {0.1, 0.25, 0.5}.
Arms, on the same ConvNet (3x3 conv, 3x3 stride-2 conv per width, Flatten,
Dense; the ResNet arm: `lipschitz_resnet(8)`, trained with its own logit scale,
epochs and schedule, `--resnet_*`):

* lipschitz: `models.lipschitz_convnet` / `lipschitz_resnet` (every layer
  constrained by the certified path to 1, logits times `scale`); certificate
  `lipschitz_bound`.
* spectral_norm: every conv and the Dense wrapped in
  `keras.layers.SpectralNormalization` (power iteration on the reshaped kernel
  matrix), logits times `scale`. Its own certificate, made sound: per layer
  the exact norm of the reshaped matrix (SVD) times ceil(k / s) per spatial
  axis (an input pixel meets at most that many windows of a k-tap, stride-s
  conv, Tsuzuku et al. 2018), times `scale`. Also `lipschitz_bound` of the
  same trained model (our exact certificate of it).
* paper: the ConvNet with BatchNormalization after every conv, ReLU,
  `OperatorNormClipper(1.0, every_n_steps=100, method="paper")` on the convs
  (Dense and BN free), BN re-estimated at the end; certificate
  `lipschitz_bound` (BN folded).

Per arm: clean accuracy; certified accuracy at each eps; PGD-l2 robust
accuracy (`PGD_STEPS` steps of size 2.5 eps / steps on the margin loss,
`PGD_RESTARTS` restarts from random points in the ball, the worst per
example); the empirical lower bound on the Lipschitz constant: the largest
of `empirical_lower_bound` started from every test image (Jacobian power
iteration, gradient-ascent pairs at the image, and free pairs ascended in
both endpoints) and ||f(x) - f(x')|| / ||x - x'|| over all attack pairs.
"""

import argparse
import json
import math
import time

import keras
import numpy as np
import tensorflow as tf

import tfconvnorm
from tfconvnorm import models
from tfconvnorm.models import cifar_input
from benchmarks.attacks import PGD_RESTARTS, PGD_STEPS, pgd_l2

EPS = (0.1, 0.25, 0.5)


def digits():
    train, _ = cifar_input.build_dataset("digits", "train", 1437, is_training=False,
                                         normalize="unit")
    test, _ = cifar_input.build_dataset("digits", "test", 360, normalize="unit")
    (x_train, y_train), = [(x.numpy(), y.numpy()) for x, y in train]
    (x_test, y_test), = [(x.numpy(), y.numpy()) for x, y in test]
    return x_train, y_train, x_test, y_test


def convnet(kind, scale, widths=(16, 32)):
    """The arms' ConvNet: kind "spectral_norm" or "paper" (BN)."""
    wrap = keras.layers.SpectralNormalization if kind == "spectral_norm" else (lambda l: l)
    inputs = keras.Input((32, 32, 1))
    x = inputs
    for i, width in enumerate(widths):
        for j, strides in enumerate((1, 2)):
            x = wrap(keras.layers.Conv2D(width, 3, strides=strides, padding="same",
                                         name=f"conv{i}{'ab'[j]}"))(x)
            if kind == "paper":
                x = keras.layers.BatchNormalization(name=f"bn{i}{'ab'[j]}")(x)
            x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = wrap(keras.layers.Dense(10, name="logits"))(x)
    outputs = keras.layers.Rescaling(scale)(x)
    return keras.Model(inputs, outputs, name=kind)


def spectral_norm_certificate(model, scale):
    """The SpectralNormalization arm's own sound certificate (see the docstring)."""
    product = scale
    for layer in model.layers:
        if not isinstance(layer, keras.layers.SpectralNormalization):
            continue
        inner = layer.layer
        kernel = keras.ops.convert_to_numpy(inner.kernel).astype(np.float64)
        matrix = kernel.reshape(-1, kernel.shape[-1])
        factor = 1.0
        if isinstance(inner, keras.layers.Conv2D):
            for k, s in zip(inner.kernel_size, inner.strides):
                factor *= math.ceil(k / s)
        product *= np.linalg.norm(matrix, 2) * factor
    return float(product)


def unwrapped(model, scale):
    """The SpectralNormalization arm as a plain ConvNet with its (normalized)
    kernels: in inference the wrapper applies the inner layer's kernel as is,
    which its last training step set to the normalized one."""
    plain = convnet("plain", scale)
    for layer in model.layers:
        if isinstance(layer, keras.layers.SpectralNormalization):
            plain.get_layer(layer.layer.name).set_weights(layer.layer.get_weights())
    return plain


def evaluate(model, certificate, x, y, empirical_x):
    logits = model(x, training=False).numpy()
    clean = float(np.mean(np.argmax(logits, axis=1) == y))
    row = dict(clean_accuracy=clean, certificate=certificate,
               certified_accuracy=tfconvnorm.certified_accuracy(model, (x, y), list(EPS),
                                                                lipschitz=certificate))
    lower = float(tfconvnorm.empirical_lower_bound(model, empirical_x))
    robust = {}
    for eps in EPS:
        broken, found = pgd_l2(model, x, y, eps)
        robust[eps] = float(np.mean(~broken))
        if broken.any():
            moved = model(found[broken], training=False).numpy() - logits[broken]
            ratio = (np.linalg.norm(moved, axis=1)
                     / np.linalg.norm((found[broken] - x[broken]).reshape(broken.sum(), -1),
                                      axis=1))
            lower = max(lower, float(ratio.max()))
    row.update(pgd_robust_accuracy=robust, empirical_lower_bound=lower,
               certificate_over_empirical=certificate / lower)
    return row


def train(model, x, y, epochs, callbacks=(), lr=1e-3, schedule="constant"):
    if schedule == "cosine":  # to zero over the run (64-example batches)
        lr = keras.optimizers.schedules.CosineDecay(lr, epochs * -(-len(x) // 64))
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.time()
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=list(callbacks),
              shuffle=True)
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--scale", type=float, default=10.0,
                        help="logit scale of every arm (its certificate's factor)")
    parser.add_argument("--activation", default="maxmin")
    parser.add_argument("--lr_schedule", default="constant", choices=("constant", "cosine"),
                        help="Adam's learning rate for every arm: constant, or cosine decay "
                        "to zero")
    parser.add_argument("--resnet_scale", type=float, default=14.0,
                        help="the ResNet arms' logit scale: each Average(skip, branch) halves "
                        "what its branch adds, so the deeper network needs more than the "
                        "ConvNet (at 10: 94.2%% clean, BENCHMARKS.md)")
    parser.add_argument("--resnet_epochs", type=int, default=60)
    parser.add_argument("--resnet_lr_schedule", default="cosine", choices=("constant", "cosine"))
    parser.add_argument("--resnet_width", type=int, default=16,
                        help="channels of the ResNet arm's first stage")
    parser.add_argument("--empirical_examples", type=int, default=None,
                        help="test images the empirical lower bound starts from "
                        "(default: all)")
    parser.add_argument("--arms", default="lipschitz_convnet,lipschitz_resnet8,"
                        "spectral_norm_convnet,paper_protocol_convnet")
    parser.add_argument("--save_data", default=None,
                        help="also write the split to this .npz (for benchmarks.deel_lip_arm)")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test = digits()
    if args.save_data:
        np.savez(args.save_data, x_train=x_train, y_train=y_train, x_test=x_test,
                 y_test=y_test)
    empirical_x = x_test[:args.empirical_examples]
    results = dict(epochs=args.epochs, scale=args.scale, eps=EPS, pgd_steps=PGD_STEPS,
                   pgd_restarts=PGD_RESTARTS, lr_schedule=args.lr_schedule,
                   empirical_examples=len(empirical_x), resnet_width=args.resnet_width,
                   resnet_scale=args.resnet_scale, resnet_epochs=args.resnet_epochs,
                   resnet_lr_schedule=args.resnet_lr_schedule,
                   arms={})

    def record(name, model, seconds, certificate, **extra):
        row = evaluate(model, certificate, x_test, y_test, empirical_x)
        row.update(train_time_s=seconds, **extra)
        results["arms"][name] = row
        print(name, json.dumps(row), flush=True)

    arms = args.arms.split(",")
    if "lipschitz_convnet" in arms:
        model = models.lipschitz_convnet((32, 32, 1), 10, lipschitz=args.scale,
                                         widths=(16, 32), activation=args.activation)
        seconds = train(model, x_train, y_train, args.epochs, schedule=args.lr_schedule)
        record("lipschitz_convnet", model, seconds, float(tfconvnorm.lipschitz_bound(model)))
    for depth in (8, 14):  # arms lipschitz_resnet8, lipschitz_resnet14
        if f"lipschitz_resnet{depth}" in arms:
            model = models.lipschitz_resnet((32, 32, 1), 10, depth, lipschitz=args.resnet_scale,
                                            width=args.resnet_width,
                                            activation=args.activation)
            seconds = train(model, x_train, y_train, args.resnet_epochs,
                            schedule=args.resnet_lr_schedule)
            record(f"lipschitz_resnet{depth}", model, seconds,
                   float(tfconvnorm.lipschitz_bound(model)))
    if "spectral_norm_convnet" in arms:
        spectral_norm_arm(args, x_train, y_train, x_test, record)
    if "paper_protocol_convnet" in arms:
        paper_arm(args, x_train, y_train, record)

    results.update(tensorflow=tf.__version__, keras=keras.__version__,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    text = json.dumps(results, indent=1)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)


def spectral_norm_arm(args, x_train, y_train, x_test, record):
    model = convnet("spectral_norm", args.scale)
    seconds = train(model, x_train, y_train, args.epochs, schedule=args.lr_schedule)
    plain = unwrapped(model, args.scale)
    np.testing.assert_allclose(plain(x_test[:8]).numpy(), model(x_test[:8]).numpy(), rtol=1e-4,
                               atol=1e-4)
    record("spectral_norm_convnet", model, seconds, spectral_norm_certificate(model, args.scale),
           exact_lipschitz_bound=float(tfconvnorm.lipschitz_bound(plain)))


def paper_arm(args, x_train, y_train, record):
    model = convnet("paper", 1.0)
    clipper = tfconvnorm.OperatorNormClipper(1.0, every_n_steps=100, method="paper",
                                             kinds=tfconvnorm.CONV_KINDS)
    seconds = train(model, x_train, y_train, args.epochs, callbacks=[clipper], lr=1e-2,
                    schedule=args.lr_schedule)
    tfconvnorm.recalibrate_batch_norm(
        model, tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(128), 12)
    record("paper_protocol_convnet", model, seconds, float(tfconvnorm.lipschitz_bound(model)))


if __name__ == "__main__":
    main()
