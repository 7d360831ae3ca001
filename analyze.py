"""Analyses a trained network's convolutions: `python analyze.py --checkpoint=... --output_dir=...`.

The same command as the installed `tfconvnorm-analyze`; see
`tfconvnorm.cli.analyze` for the flags and `tfconvnorm.analysis` for the work.
"""

from tfconvnorm.cli import analyze

if __name__ == "__main__":
    analyze.run()
