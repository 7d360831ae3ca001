"""What must happen before TensorFlow is imported (so: no TensorFlow here).

The command-line tools start quietly: TensorFlow's C++ start-up logging
(oneDNN notice, absl's InitializeLog warning) is kept off the terminal
unless the user set `TF_CPP_MIN_LOG_LEVEL`. TensorFlow 2.21 prints its
oneDNN notice whatever that variable says, so for the tools the import's
native stderr goes to /dev/null (Python errors of the import are still
raised and shown). A library import in a user's program changes nothing:
the tools are recognised by the program's name.
"""

import contextlib
import os
import sys

_CONSOLE_SCRIPTS = ("tfconvnorm-analyze", "tfconvnorm-train")
# The thin scripts at the root of a checkout, next to the package.
_CHECKOUT_SCRIPTS = ("train.py", "analyze.py", "demo.py")


def _is_our_tool(argv0):
    name = os.path.basename(argv0)
    if name in _CONSOLE_SCRIPTS:
        return True
    if name not in _CHECKOUT_SCRIPTS:
        return False
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.dirname(os.path.abspath(argv0)) == checkout


def _quiet_wanted():
    return (bool(sys.argv) and bool(sys.argv[0]) and _is_our_tool(sys.argv[0])
            and "TF_CPP_MIN_LOG_LEVEL" not in os.environ)


@contextlib.contextmanager
def quiet_tensorflow_import():
    """Around the first TensorFlow import: for the tools (see above), native
    stderr off and `TF_CPP_MIN_LOG_LEVEL=2` for the rest of the run."""
    if not _quiet_wanted() or "tensorflow" in sys.modules:
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w", encoding="utf-8") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
