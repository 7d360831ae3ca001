r"""Runs the suite against each mutant of `tests/mutants.py`; every one must be caught.

    python tests/mutation_check.py                 # all mutants, non-slow tests
    python tests/mutation_check.py norms_1pct_low  # some of them
    python tests/mutation_check.py --slow          # include the slow tests

Per mutant: `pytest -x` with TFCONVNORM_MUTANT set, stopping at the first
failure, on the numerical test files first and then, if none failed, on the
rest; prints which test caught it (or SURVIVED). Exit status 1 if any
mutant survives. A survivor costs a whole suite run (minutes); a caught one
seconds to a minute.
"""

import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import mutants  # pylint: disable=wrong-import-position


# The files with the numerical oracles run first, as a stage of their own: most
# mutants are caught there within a minute and -x stops, instead of after
# whichever end-to-end test happened to come first.
FIRST = ("test_spectral.py", "test_projection_quality.py", "test_padding.py",
         "test_layer_bounds.py", "test_matmul_path.py", "test_constraints.py",
         "test_lipschitz.py", "test_callbacks.py", "test_robustness.py", "test_geometry.py")


def test_file_stages(name):
    """The mutant's suspect file (`mutants.SUSPECTS`), the other FIRST files, then
    the rest: a mutant caught early never collects the later files."""
    suspect = mutants.SUSPECTS.get(name)
    first = [f for f in FIRST if f != suspect]
    rest = sorted(f for f in os.listdir(HERE) if f.startswith("test_") and f.endswith(".py")
                  and f not in FIRST and f != suspect)
    stages = ([suspect] if suspect else []), first, rest
    return [[os.path.join(HERE, f) for f in stage] for stage in stages if stage]


def run(name, slow=False, workers=2):
    env = dict(os.environ, TFCONVNORM_MUTANT=name)
    started = time.time()
    for files in test_file_stages(name):
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                   "-n", str(workers), "--dist", "worksteal"] + files
        if not slow:
            command += ["-m", "not slow"]
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              cwd=os.path.dirname(HERE))
        if done.returncode != 0:
            break
    failed = re.findall(r"^FAILED (\S+)", done.stdout, re.MULTILINE)
    return done.returncode, failed, time.time() - started, done.stdout[-2000:]


def main(argv):
    slow = "--slow" in argv
    names = [a for a in argv if not a.startswith("--")] or sorted(mutants.MUTANTS)
    survivors = []
    for name in names:
        code, failed, seconds, tail = run(name, slow)
        if code == 0:
            survivors.append(name)
            print(f"{name}: SURVIVED ({seconds:.0f} s)", flush=True)
        elif failed:
            print(f"{name}: caught by {failed[0]} ({seconds:.0f} s)", flush=True)
        else:
            print(f"{name}: pytest exited {code} without a failing test ({seconds:.0f} s):\n"
                  f"{tail}", flush=True)
            survivors.append(name)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
