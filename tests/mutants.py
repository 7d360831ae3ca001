"""Plausible wrong versions of public functions, for checking that the suite
catches them (issue 15's mutation check). `tests/mutation_check.py` runs the
suite once per mutant with TFCONVNORM_MUTANT=<name>; conftest.py then calls
`apply(name)` before any test runs, in every xdist worker.

Each mutant replaces a function by a wrong one everywhere it is bound (every
loaded tfconvnorm module holding the same object), so that internal callers
get it too, as they would if the source itself were wrong.
"""

import sys


def _replace_everywhere(original, replacement):
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "tfconvnorm" or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                setattr(module, attribute, replacement)


def _wrap(module_name, function_name, make):
    __import__(module_name)
    module = sys.modules[module_name]
    original = getattr(module, function_name)
    _replace_everywhere(original, make(original))


def _method_swap(wrong_for):
    """The `eigh` path's projections (`clip_and_norms_many`, under
    clip_conv_singular_values_many and the clipper) running another method
    than asked."""
    def make(original):
        def mutant(kernels, geometries, max_norm, method="alternating", *args, **kwargs):
            return original(kernels, geometries, max_norm, wrong_for.get(method, method),
                            *args, **kwargs)
        return mutant
    return lambda: _wrap("tfconvnorm.spectral.projection", "clip_and_norms_many", make)


def _scaled_list(module_name, function_name, factor):
    def make(original):
        def mutant(*args, **kwargs):
            return [value * factor for value in original(*args, **kwargs)]
        return mutant
    return lambda: _wrap(module_name, function_name, make)


def _circular_at_input_size():
    """The zero-padded layer measured as the circular conv at its input size
    (the published number, not a bound), wherever the strides allow."""
    def make(original):
        def mutant(kernel_size, input_shape, strides=1, dilation_rate=1, padding="same"):
            real = original(kernel_size, input_shape, strides, dilation_rate, padding)
            try:
                circular = original(kernel_size, input_shape, strides, dilation_rate, "circular")
            except ValueError:
                return real
            return real._replace(input_shape=circular.input_shape)
        return mutant
    return lambda: _wrap("tfconvnorm.spectral.padding", "circular_embedding", make)


def _gelu_as_one():
    import tfconvnorm.lipschitz as lipschitz  # pylint: disable=import-outside-toplevel
    lipschitz.ACTIVATION_CONSTANTS["gelu"] = 1.0


def _max_pool_without_overlap():
    def make(original):
        return lambda *args, **kwargs: 1
    return _wrap("tfconvnorm.lipschitz", "_max_pool_multiplicity", make)


def _bounds_without_lower():
    """Certified intervals whose lower end is 10% low (still 'valid', useless)."""
    def make(original):
        def mutant(*args, **kwargs):
            return [b._replace(lower=b.lower * 0.9) for b in original(*args, **kwargs)]
        return mutant
    return lambda: _wrap("tfconvnorm.spectral.bounds", "conv_operator_norm_bounds_many", make)


def _bound_shrunk():
    """Every projection onto a ball 0.1% smaller than asked: still within the
    bound (feasibility tests pass), but not the projection asked for."""
    def make(original):
        def mutant(kernels, geometries, max_norm, method="alternating", **kwargs):
            return original(kernels, geometries, max_norm * (1 - 1e-3), method=method, **kwargs)
        return mutant
    return lambda: _wrap("tfconvnorm.spectral.projection", "clip_conv_singular_values_many", make)


MUTANTS = {
    "default_projection_is_rescale": _method_swap({"alternating": "rescale"}),
    "paper_is_rescale": _method_swap({"paper": "rescale"}),
    "exact_is_alternating": _method_swap({"exact": "alternating"}),
    "alternating_is_paper": _method_swap({"alternating": "paper"}),
    "norms_1pct_low": _scaled_list("tfconvnorm.spectral.spectra", "conv_operator_norm_many",
                                   0.99),
    "spectra_1pct_low": _scaled_list("tfconvnorm.spectral.spectra", "conv_singular_values_many",
                                     0.99),
    "padding_ignored": _circular_at_input_size(),
    "bound_shrunk_0.1pct": _bound_shrunk(),
    "lower_bounds_10pct_low": _bounds_without_lower(),
    "gelu_constant_1": _gelu_as_one,
    "max_pool_overlap_ignored": _max_pool_without_overlap,
    # The training-time path: its certified bound 1% low (the constraint and
    # regularizer then under-shrink).
    "matmul_bound_1pct_low": lambda: _wrap(
        "tfconvnorm.spectral.matmul", "norm_upper_bound",
        lambda original: lambda *args, **kwargs: original(*args, **kwargs) * 0.99),
}


#: Where each mutant is expected to be caught: tests/mutation_check.py runs that
#: file first (one short pytest run) and the rest of the suite only if it did not
#: fail, so the check takes minutes, not a suite run per mutant. A wrong guess
#: costs time, never a verdict.
SUSPECTS = {
    "default_projection_is_rescale": "test_projection_quality.py",
    "paper_is_rescale": "test_spectral.py",
    "exact_is_alternating": "test_spectral.py",
    "alternating_is_paper": "test_padding.py",
    "norms_1pct_low": "test_spectral.py",
    "spectra_1pct_low": "test_spectral.py",
    "padding_ignored": "test_padding.py",
    "bound_shrunk_0.1pct": "test_padding.py",
    "lower_bounds_10pct_low": "test_layer_bounds.py",
    "gelu_constant_1": "test_lipschitz.py",
    "max_pool_overlap_ignored": "test_lipschitz.py",
    "matmul_bound_1pct_low": "test_matmul_path.py",
}


def apply(name):
    if name not in MUTANTS:
        raise ValueError(f"TFCONVNORM_MUTANT must be one of {sorted(MUTANTS)}, got {name!r}")
    import importlib  # pylint: disable=import-outside-toplevel
    # Every module loaded first, so that each binding of the original is replaced.
    for module in ("tfconvnorm", "tfconvnorm.lipschitz", "tfconvnorm.callbacks",
                   "tfconvnorm.constraints", "tfconvnorm.analysis", "tfconvnorm.training",
                   "tfconvnorm.checkpoints"):
        importlib.import_module(module)
    MUTANTS[name]()
