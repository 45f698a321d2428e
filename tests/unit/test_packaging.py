"""The packaging rules of pyproject.toml, README and scripts/setup.sh, checked statically.

The install test (tests/integration/test_install.py) installs the built wheel per role;
these checks say why a role's dependency list is what it is, and fail at once when a new
dependency breaks a rule:

* no extra pins torch (a user's CUDA build must survive every install);
* exactly one ONNX Runtime flavour per extra (onnxruntime and onnxruntime-gpu overwrite
  each other's module);
* every extra a ``require()`` site names exists, and the README lists every extra.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from headrace.client import optional

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("client", "workers", "models", "cluster")
BASE = {"redis", "msgpack", "numpy", "tqdm", "click", "rich"}
HEAVY = {"torch", "ray", "onnxruntime", "onnxruntime-gpu", "tokenizers", "onnx", "tensorflow", "tensorflow-cpu",
         "scikit-learn", "matplotlib", "tensorrt", "fastapi", "transformers"}
ORT = {"onnxruntime": "worker-cpu", "onnxruntime-gpu": "worker-gpu"}
GPU_ONLY = {"worker-gpu", "tensorrt"}  # not installable on the CPU-only CI machine


def project() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def extras() -> dict[str, list[Requirement]]:
    return {k: [Requirement(r) for r in v] for k, v in project()["optional-dependencies"].items()}


def closure(extra: str) -> set[str]:
    """Distribution names (normalised) an extra brings, following ``headrace[...]``."""
    out: set[str] = set()
    todo, seen = [extra], set()
    table = extras()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for r in table[e]:
            if r.name == "headrace":
                todo.extend(r.extras)
            else:
                out.add(r.name.lower().replace("_", "-"))
    return out


def test_base_install_is_the_light_sdk() -> None:
    names = {Requirement(r).name.lower() for r in project()["dependencies"]}
    assert names == BASE
    assert not names & HEAVY


def test_torch_is_bounded_below_only() -> None:
    reqs = [Requirement(r) for r in project()["dependencies"]] + [r for rs in extras().values() for r in rs]
    torch = [r for r in reqs if r.name.lower() == "torch"]
    assert torch, "the torch extra lists torch"
    for r in torch:
        ops = {s.operator for s in r.specifier}
        assert ops == {">="}, f"{r}: torch takes a lower bound only (pins go to constraints/cpu.txt)"


def test_exactly_one_onnxruntime_flavour_per_extra() -> None:
    for name in extras():
        flavours = {dist for dist in ORT if dist in closure(name)}
        if name in ORT.values():
            assert flavours == {d for d, e in ORT.items() if e == name}, name
        else:
            assert not flavours, f"[{name}] brings {flavours}: only worker-cpu / worker-gpu may"


def test_self_references_name_existing_extras() -> None:
    table = extras()
    for name, reqs in table.items():
        for r in reqs:
            if r.name == "headrace":
                assert r.extras and r.extras <= set(table), f"[{name}] refers to unknown extras {r.extras}"
                assert not r.specifier, "a self-reference carries no version"


def test_worker_alternatives_are_real_extras() -> None:
    assert set(optional.WORKER) == set(ORT.values()) <= set(extras())


def _require_calls(tree: ast.Module) -> list[ast.Call]:
    """Calls of the helpers imported from headrace.client.optional (``require`` alone is
    also the name of the settings validator in headrace.client.config)."""
    names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             and n.module == "headrace.client.optional" for a in n.names}
    names &= {"require", "require_all", "install_command"}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) in names]


def _extras_named(node: ast.AST, assigned: dict[str, ast.AST]) -> set[str]:
    """String extras in an argument: literals, WORKER, or a module-level table of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Name):
        if node.id == "WORKER":
            return set(optional.WORKER)
        if node.id in assigned:
            return _extras_named(assigned[node.id], assigned)
        raise AssertionError(f"cannot read the extras of {node.id}")
    if isinstance(node, ast.Subscript):
        return _extras_named(node.value, assigned)
    if isinstance(node, ast.Dict):  # a require_all table (module -> extra) or a table of them
        return set().union(*(_extras_named(v, assigned) for v in node.values if v is not None))
    if isinstance(node, ast.IfExp):
        return _extras_named(node.body, assigned) | _extras_named(node.orelse, assigned)
    if isinstance(node, (ast.Tuple, ast.List)):
        return set().union(*(_extras_named(e, assigned) for e in node.elts))
    raise AssertionError(f"unreadable extras argument: {ast.dump(node)}")


def test_every_require_site_names_an_existing_extra() -> None:
    known, seen = set(extras()), set()
    sites = 0
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            assigned = {t.id: n.value for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            for call in _require_calls(tree):
                fn = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
                args = call.args[1:] if fn == "require" else call.args
                named = set().union(*(_extras_named(a, assigned) for a in args)) if args else set()
                assert named, f"{path}:{call.lineno}: {fn}() names no extra"
                assert named <= known, f"{path}:{call.lineno}: unknown extras {named - known}"
                seen |= named
                sites += 1
    assert sites >= 20, "the optional import sites go through require()"
    assert {"worker-cpu", "worker-gpu", "torch", "ray", "compress", "plot", "demo", "tensorrt"} <= seen


def test_readme_lists_every_extra() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    listed = {e for group in re.findall(r'headrace\[([a-z0-9,-]+)\]', section) for e in group.split(",")}
    assert set(extras()) <= listed, f"README install section misses {set(extras()) - listed}"
    assert listed <= set(extras()), f"README names extras that do not exist: {listed - set(extras())}"


def test_setup_installs_every_cpu_role_under_the_constraints() -> None:
    script = (ROOT / "scripts" / "setup.sh").read_text()
    m = re.search(r'^EXTRAS="([a-z0-9,-]+)"', script, re.M)
    assert m, "setup.sh names its extras in EXTRAS=..."
    assert set(m.group(1).split(",")) == set(extras()) - GPU_ONLY
    c = re.search(r'^CONSTRAINTS=(\S+)', script, re.M)
    assert c and (ROOT / c.group(1)).is_file()
    assert '-c "$CONSTRAINTS"' in script and '$CONSTRAINTS"' in script.split("sha256sum")[0]
    pins = [Requirement(line) for line in (ROOT / c.group(1)).read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    torch = [r for r in pins if r.name == "torch"]
    assert torch and {s.operator for s in torch[0].specifier} == {"=="}
    lower = next(r for r in extras()["torch"] if r.name == "torch")
    assert lower.specifier.contains(next(iter(torch[0].specifier)).version), "the pinned torch meets the bound"


@pytest.mark.parametrize("extra", ["worker-cpu", "worker-gpu"])
def test_worker_extras_differ_only_in_the_runtime(extra: str) -> None:
    other = "worker-gpu" if extra == "worker-cpu" else "worker-cpu"
    assert closure(extra) - {"onnxruntime", "onnxruntime-gpu"} == closure(other) - {"onnxruntime", "onnxruntime-gpu"}


# Imports that are optional by design and belong to no extra, with the reason.
UNDECLARED_OK = {
    "redis_server": "fallback redis-server binary for `headrace redis`/the demo when none is on PATH",
}


def _imported_top_levels() -> dict[str, str]:
    """Top-level third-party modules the package sources import -> first file importing it."""
    out: dict[str, str] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    top = n.split(".")[0]
                    if top != "headrace" and top not in sys.stdlib_module_names and top != "__future__":
                        out.setdefault(top, str(path.relative_to(ROOT)))
    return out


def test_every_import_of_the_package_is_declared_by_a_role() -> None:
    # The dev extra installs everything, so a module that only dev (or only some other
    # package's dependencies) brings passes every test here and fails for users: each
    # third-party import must be named by the base install or a role's extra itself.
    declared = {Requirement(r).name.lower() for r in project()["dependencies"]}
    for name in extras():
        if name != "dev":
            declared |= closure(name)
    owners = md.packages_distributions()
    missing = {}
    for top, where in _imported_top_levels().items():
        dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
        if top in UNDECLARED_OK or dists & declared:
            continue
        if not dists and top.replace("_", "-") in declared:
            continue  # not installable here (tensorrt: CUDA only), declared under its own name
        missing[top] = (where, sorted(dists))
    assert not missing, f"imports no role declares (add them to an extra in pyproject.toml): {missing}"
