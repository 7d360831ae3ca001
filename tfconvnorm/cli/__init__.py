"""Command-line tools: flags only; the work is in the library (`analysis`, `training`)."""

import sys

from absl import flags


def define_key_flags(define_flags, doc=None, flag_values=flags.FLAGS):
    """Runs `define_flags(flag_values)` and makes the flags it defines key flags
    of the main program, so that `--help` lists them with their help text
    (absl's `--help` shows the main module's key flags only; these are
    defined in the library, not in the console script's module). `doc`
    becomes the usage text where the main module has none (console scripts)."""
    main = sys.modules.get("__main__")
    if doc and main is not None and not getattr(main, "__doc__", None):
        main.__doc__ = doc
    before = set(flag_values)
    define_flags(flag_values)
    program = sys.argv[0] if sys.argv else ""
    for name in sorted(set(flag_values) - before):
        flag_values.register_key_flag_for_module(program, flag_values[name])
