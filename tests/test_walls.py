"""The walls between sgl_slim's parts: only ``sgl_slim.integration`` imports SGLang; benchmarks import no test
module.

Two checks, each able to fail on its own: the source of every module outside ``integration`` (the stand-ins'
``common_ops`` shims included, which sgl_kernel's loader imports) has no ``import sglang`` / ``import sgl_kernel``
anywhere, lazy imports inside functions included; and importing every module of the algorithm packages, the
stand-ins and the launcher in a fresh interpreter leaves ``sglang`` out of ``sys.modules`` (so no indirect import
sneaks it in either).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sgl_slim"
OUTSIDE_THE_WALL = {"integration"}
ALGORITHM_PACKAGES = ["attention", "vision", "audio", "spec"]
SGLANG_ROOTS = {"sglang", "sgl_kernel"}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, wherever the import statement is."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def modules_inside_the_wall() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.relative_to(PACKAGE).parts[0] not in OUTSIDE_THE_WALL)


def test_the_source_scan_sees_sglang_imports():
    # the scan below would prove nothing if it missed the integration package's lazy and top-level imports
    assert SGLANG_ROOTS & imported_roots(PACKAGE / "integration" / "server.py")
    assert "sglang" in imported_roots(PACKAGE / "integration" / "plugin.py") | \
        imported_roots(PACKAGE / "integration" / "s2o_backend.py")


def test_no_module_outside_integration_imports_sglang():
    scanned = modules_inside_the_wall()
    for name in ALGORITHM_PACKAGES:
        assert any(p.relative_to(PACKAGE).parts[0] == name for p in scanned), f"sgl_slim/{name} not scanned"
    offenders = {str(p.relative_to(ROOT)): sorted(imported_roots(p) & SGLANG_ROOTS) for p in scanned}
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}, f"only sgl_slim/integration/ may import sglang: {offenders}"


def _sglang_modules_after_importing(modules: list[str]) -> dict:
    """In a fresh interpreter, import each of ``modules`` with all its submodules, in order; for each, the
    submodules imported and the sglang / sgl_kernel modules in ``sys.modules`` after it."""
    code = ("import importlib, json, pkgutil, sys\n"
            "out = {}\n"
            f"for name in {modules!r}:\n"
            "    mod = importlib.import_module(name)\n"
            "    names = [name]\n"
            "    for info in pkgutil.walk_packages(getattr(mod, '__path__', []), name + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "        names.append(info.name)\n"
            "    out[name] = {'imported': names, 'sglang': sorted(m for m in sys.modules\n"
            "                                                     if m.split('.')[0] in ('sglang', 'sgl_kernel'))}\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def imports_in_a_fresh_process():
    # one interpreter for all (torch's import dominates); the first module that pulls sglang in is the culprit
    return _sglang_modules_after_importing(["sgl_slim.launch", "sgl_slim.config", "sgl_slim.demo",
                                            "sgl_slim.integration.server", "sgl_slim.standins",
                                            *(f"sgl_slim.{p}" for p in ALGORITHM_PACKAGES)])


@pytest.mark.parametrize("package", ALGORITHM_PACKAGES)
def test_importing_an_algorithm_package_leaves_sglang_out(imports_in_a_fresh_process, package):
    got = imports_in_a_fresh_process[f"sgl_slim.{package}"]
    assert len(got["imported"]) >= 2, f"sgl_slim.{package}: expected its submodules too, got {got['imported']}"
    assert got["sglang"] == [], f"importing sgl_slim.{package} pulled in {got['sglang'][:10]}"


def test_importing_the_launcher_leaves_sglang_out(imports_in_a_fresh_process):
    # the launcher must set SGLang's CPU mode in the environment before sglang is first imported; the server
    # module imports sglang only when it is called
    got = imports_in_a_fresh_process["sgl_slim.integration.server"]
    assert got["sglang"] == [], f"importing the launcher pulled in {got['sglang'][:10]}"


def test_importing_the_standins_leaves_sglang_out(imports_in_a_fresh_process):
    # the launcher decides the GPU stand-in mode and sets its environment before sglang is first imported
    got = imports_in_a_fresh_process["sgl_slim.standins"]
    assert "sgl_slim.standins.gpu_ops" in got["imported"], got["imported"]
    assert got["sglang"] == [], f"importing sgl_slim.standins pulled in {got['sglang'][:10]}"


def test_the_import_check_sees_sglang():
    got = _sglang_modules_after_importing(["sglang.srt.plugins.hook_registry"])
    assert "sglang" in got["sglang.srt.plugins.hook_registry"]["sglang"]


def test_benchmarks_import_no_test_module():
    offenders = {p.name: sorted(imported_roots(p) & {"tests", "conftest", "serving"})
                 for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}, f"benchmarks must not import test modules: {offenders}"
