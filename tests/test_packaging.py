"""Packaging: the declared runtime dependencies are exactly what the package imports, and the optional
plot dependency is optional (a clear message without it)."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from nemojax.train.metrics import LOSS_CURVE_FILE, METRICS_FILE, plot_loss_curve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("nemojax", "pallas_kernels")
# Modules imported only where an extra is installed: module -> (extra, the files allowed to import it).
OPTIONAL = {"matplotlib": ("plot", {"nemojax/train/metrics.py"})}


def _project() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("ml-dtypes>=0.5" -> "ml-dtypes")."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported by the shipped packages that are neither stdlib nor ours -> importing files."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(REPO, package)):
            for file in (f for f in files if f.endswith(".py")):
                path = os.path.join(directory, file)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        names = [node.module]
                    else:
                        continue
                    for top in {n.split(".")[0] for n in names}:
                        if top not in sys.stdlib_module_names and top not in PACKAGES:
                            found.setdefault(top, set()).add(os.path.relpath(path, REPO))
    return found


def test_runtime_dependencies_are_what_the_package_imports():
    """Every third-party import is a declared dependency (an extra only where listed in OPTIONAL), and
    every declared runtime dependency is imported somewhere."""
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    imported = set()
    for module, files in _third_party_imports().items():
        names = {_name(d) for d in distributions.get(module, [module])}
        if module in OPTIONAL:
            extra, allowed = OPTIONAL[module]
            assert files <= allowed, f"{module} (the {extra!r} extra) imported by {sorted(files - allowed)}"
            assert names & {_name(r) for r in project["optional-dependencies"][extra]}, (module, extra)
            continue
        assert names & runtime, f"{module} imported by {sorted(files)} but not in [project] dependencies"
        imported |= names
    assert runtime <= imported, f"declared but never imported: {sorted(runtime - imported)}"


def _write_metrics(workdir) -> None:
    with open(os.path.join(workdir, METRICS_FILE), "w") as f:
        for step, loss in enumerate([5.0, 4.0, 3.5], start=1):
            f.write(json.dumps({"step": step, "loss": loss, "lm_loss": loss - 0.1}) + "\n")


def test_loss_curve_is_a_png(tmp_path):
    _write_metrics(tmp_path)
    path = plot_loss_curve(str(tmp_path))
    assert path == os.path.join(tmp_path, LOSS_CURVE_FILE)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_loss_curve_keeps_the_callers_matplotlib_backend(tmp_path):
    """A notebook (inline backend) or script that trains keeps its backend: the plot does not switch it."""
    import matplotlib  # the plot extra, installed in both test lanes
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        _write_metrics(tmp_path)
        assert plot_loss_curve(str(tmp_path)) is not None
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


def test_loss_curve_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    _write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot_loss_curve(str(tmp_path)) is None
    assert "pip install 'nemojax[plot]'" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tmp_path, LOSS_CURVE_FILE))


@pytest.mark.parametrize("lock", ["py311.lock", "py312.lock"])
def test_locks_pin_every_requirement(lock):
    """The locks (requirements/*.lock) pin each runtime, test and plot dependency to a version that its
    requirement admits; torch only in the Python 3.11 lock (the lane with the on-disk CPU wheel)."""
    with open(os.path.join(REPO, "requirements", lock)) as f:
        pinned = {_name(line): line.split("==", 1)[1].strip() for line in f if "==" in line}
    project = _project()
    extras = ["test", "plot"] + (["torch"] if lock == "py311.lock" else [])
    for text in project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]:
        requirement = Requirement(text)
        name = _name(requirement.name)
        assert name in pinned, f"{lock} lacks {name}: regenerate it with `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (lock, text, pinned[name])
    assert ("torch" in pinned) == (lock == "py311.lock")


@pytest.mark.parametrize("caller, want", [
    ("", "--xla_force_host_platform_device_count=8"),
    ("--xla_cpu_use_thunk_runtime=true", "--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=8"),
    ("--xla_force_host_platform_device_count=2", "--xla_force_host_platform_device_count=2"),
])
def test_conftest_keeps_the_callers_xla_flags(caller, want):
    """tests/conftest.py adds the 8-device count to a caller's XLA_FLAGS unless the caller set a count."""
    code = "import os, conftest; print(os.environ['XLA_FLAGS'])"
    env = dict(os.environ, XLA_FLAGS=caller, PYTHONPATH=os.path.join(REPO, "tests"))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == want
