"""The one-way rule of DESIGN.md: a module imports only from its own layer or the layers below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sgdstab"

#: DESIGN.md's layers, by module path prefix (the longest matching prefix wins). Layer 0 holds what
#: every layer may use; the package root only re-exports and is exempt.
LAYERS = {
    "errors": 0,
    "_checks": 0,
    "problem": 1,
    "distributed": 1,
    "operators": 2,
    "estimators": 3,
    "gram_factors": 4,
    "sample_space": 4,
    "alignment": 4,
    "stability": 4,
    "summary": 4,
    "models": 5,
    "data": 5,
    "io": 5,
    "training": 5,
    "run_spec": 5,
    "monitor": 5,
    "experiments": 6,
    "report": 6,
    "sweeps": 6,
    "integrations": 6,
    "cli": 7,
    "__main__": 7,
}


def layer_of(module: str) -> int:
    """Layer of a dotted module name inside sgdstab (without the ``sgdstab.`` prefix)."""
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(f"module sgdstab.{module} has no layer: add it to LAYERS (DESIGN.md lists the layers)")


def package_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names.append(".".join(parts))
    return names


def imported_sgdstab_modules(module: str) -> set[str]:
    """Every sgdstab module that ``module`` imports, at the top or inside a function."""
    path = PACKAGE.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: list[str]) -> set[str]:
    """The sgdstab modules a source file imports; ``package`` resolves relative imports."""
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.removeprefix("sgdstab.") for a in node.names if a.name.startswith("sgdstab.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("sgdstab."):
                target = node.module.removeprefix("sgdstab.")
            else:
                continue
            imported.add(target)
    return {name for name in imported if name}


@pytest.mark.parametrize("module", package_modules())
def test_imports_only_go_down_the_layers(module: str) -> None:
    own = layer_of(module)
    upward = sorted(m for m in imported_sgdstab_modules(module) if layer_of(m) > own)
    assert not upward, f"sgdstab.{module} (layer {own}) imports higher layers: {upward}"


def test_the_rule_catches_an_upward_import() -> None:
    source = "import torch\n\ndef f():\n    from sgdstab.experiments.runs import train_run\n    from ..io import dumps\n"
    found = imports_in(source, ["operators"])
    assert found == {"experiments.runs", "io"}
    assert all(layer_of(m) > layer_of("operators.hessian") for m in found)
    with pytest.raises(KeyError, match="has no layer"):
        layer_of("brand_new_module")
