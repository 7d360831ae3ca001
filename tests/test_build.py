"""BUILD stays in step with the tree (Bazel cannot fetch its rules offline here).

Parses the BUILD file's Python targets with `ast` (Starlark is a Python
subset) and checks that every source and test file is listed, every listed
file exists, every test file has its own py_test, and deps name real targets.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Python that belongs to the project (setup.py is packaging, not a target).
SOURCE_GLOBS = ["tfconvnorm/**/*.py", "models/*.py", "benchmarks/*.py", "*.py", "tests/*.py"]
NOT_TARGETS = {"setup.py"}


def _targets():
    tree = ast.parse((ROOT / "BUILD").read_text(), filename="BUILD")
    targets = []
    for node in tree.body:
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            continue
        call = node.value
        if not isinstance(call.func, ast.Name) or not call.func.id.startswith("py_"):
            continue
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
                  if kw.arg in ("name", "srcs", "deps", "main", "data")}
        kwargs["rule"] = call.func.id
        targets.append(kwargs)
    return targets


def _python_files():
    files = set()
    for pattern in SOURCE_GLOBS:
        files.update(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))
    return files - NOT_TARGETS


def test_build_parses_and_names_are_unique():
    names = [t["name"] for t in _targets()]
    assert names, "BUILD has no py_* targets"
    assert len(names) == len(set(names)), f"duplicate target names in BUILD: {names}"


def test_every_python_file_is_in_build():
    listed = {src for t in _targets() for src in t.get("srcs", [])}
    missing = sorted(_python_files() - listed)
    assert not missing, f"files missing from BUILD: {missing}"


def test_every_listed_file_exists():
    for target in _targets():
        for src in target.get("srcs", []) + target.get("data", []):
            assert (ROOT / src).exists(), f"BUILD target {target['name']} lists missing {src}"


def test_every_test_file_has_a_py_test():
    tests = {src for t in _targets() if t["rule"] == "py_test" for src in t["srcs"]}
    for path in sorted(ROOT.glob("tests/test_*.py")):
        assert str(path.relative_to(ROOT)) in tests, f"no py_test for {path.name}"


def test_deps_name_real_targets():
    names = {t["name"] for t in _targets()}
    for target in _targets():
        for dep in target.get("deps", []):
            if dep.startswith(":"):
                assert dep[1:] in names, f"{target['name']} depends on unknown {dep}"
            else:
                assert dep.startswith("@"), f"{target['name']}: dep {dep!r} is neither local nor external"


@pytest.mark.parametrize("binary", ["train.py", "analyze.py", "demo.py"])
def test_binaries_are_py_binary(binary):
    binaries = {src for t in _targets() if t["rule"] == "py_binary" for src in t["srcs"]}
    if (ROOT / binary).exists():
        assert binary in binaries
