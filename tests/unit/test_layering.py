"""The package's imports point one way (docs/architecture.md): core under everything; data and nets
above it; methods above nets; eval and train above those but not each other; recipes above them; tune
above recipes; the job layer (cli, tune.ablate/report) on top. No module imports a private name of
another module. Read from the source with `ast`, so a back-pointing import fails here, not on a worker."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "raygen"

# layer of each top-level part; a module may import only from its own part or lower layers
LAYER = {"core": 0, "config": 0, "data": 1, "nets": 1, "jaxgen": 1, "methods": 2, "eval": 3, "train": 3, "recipes": 4,
         "tune": 5, "cli": 6}
JOB_MODULES = {"raygen.tune.ablate", "raygen.tune.report"}  # job entry points: may use the cli helpers
SIBLINGS_APART = {("eval", "train"), ("train", "eval")}  # same layer, must not know each other


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text(), str(path))


def imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [a.name.rsplit(".", 1)[-1]]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]


def violations():
    out = []
    for name, tree in modules():
        if name == "raygen":
            continue
        own = part(name)
        for target, names in imports(tree):
            if not target.startswith("raygen.") and target != "raygen":
                continue
            if target == "raygen":  # `from raygen import recipes`
                targets = [f"raygen.{n}" for n in names]
            else:
                targets = [target]
            for t in targets:
                other = part(t)
                if other == own:
                    continue
                if other not in LAYER or own not in LAYER:
                    out.append(f"{name}: unknown layer of {t}")
                    continue
                job_ok = name in JOB_MODULES and other == "cli"
                if (LAYER[other] > LAYER[own] and not job_ok) or (own, other) in SIBLINGS_APART:
                    out.append(f"{name} imports {t} ({own} -> {other})")
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target.startswith("raygen"):
                    out.append(f"{name} imports the private name {target}.{n}")
    return out


def test_imports_point_down_and_no_private_names_cross_modules():
    assert violations() == []


def test_the_checker_catches_a_back_pointing_import(tmp_path, monkeypatch):
    """The test above must be able to fail: a data module importing train is reported."""
    tree = ast.parse("from raygen.train.driver import fit\nfrom raygen.config import _private\n")
    found = [(t, n) for t, n in imports(tree)]
    assert ("raygen.train.driver", ["fit"]) in found
    assert LAYER[part("raygen.train.driver")] > LAYER[part("raygen.data.store")]


def test_importing_train_does_not_import_tune():
    import subprocess
    import sys

    code = "import sys, raygen.train.driver, raygen.train.torch_backend; print(any(m.startswith('raygen.tune') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
