"""Trains a CIFAR ResNet V2 with operator-norm clipping: `python train.py --model_dir=...`.

The same command as the installed `tfconvnorm-train`; see `tfconvnorm.cli.train`
for the flags and `tfconvnorm.training` for the work.
"""

from tfconvnorm.cli import train

if __name__ == "__main__":
    train.run()
