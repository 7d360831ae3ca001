"""Benchmarks: tfconvnorm against the published method and the common estimates.

Run `python -m benchmarks.run --help` (or `make bench`). The competing methods
live in `benchmarks.alternatives`, the workloads in `benchmarks.workloads`.
"""
