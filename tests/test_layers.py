"""The package layering of ``pdserve/__init__.py``, checked on the source: every import of ours (at
module level or inside a function) goes to the module's own layer or one it may use."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOT_MODULES = {"cli", "cli_sim", "cli_tools", "launch", "cluster", "ray_head", "model", "profile", "contention",
                "chaos", "chaos_run", "ab_run"}
MAY_USE = {
    "base": set(),
    "protos": set(),
    "kv_transfer": {"base", "protos"},
    "engine": {"base", "kv_transfer", "protos"},
    "workers": {"base", "kv_transfer", "protos", "engine"},
    "router": {"base", "kv_transfer", "protos"},
    "tools": {"base", "kv_transfer", "protos", "router"},
    "root": {"base", "kv_transfer", "protos", "engine", "workers", "router", "tools"},
}


def layer(module: str) -> str | None:
    """The layer of one of our dotted module names; None for anything else."""
    parts = module.split(".")
    top = parts[0]
    if top in ("protos", "kv_transfer", "router"):
        return top
    if top in ("prefill_worker", "decode_worker"):
        return "workers"
    if top != "pdserve" or len(parts) == 1:
        return None if top != "pdserve" else "root"
    if parts[1] in ("base", "engine"):
        return parts[1]
    if parts[1] in ("client", "sim", "bench"):
        return "tools"
    assert parts[1] in ROOT_MODULES, f"pdserve.{parts[1]} has no layer: add it to tests/test_layers.py"
    return "root"


def imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (``from a import b`` counts ``a.b`` too: b may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def sources() -> list[tuple[str, Path]]:
    out = []
    for top in ("pdserve", "router", "kv_transfer", "prefill_worker", "decode_worker"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


@pytest.mark.parametrize("module,path", sources(), ids=lambda x: x if isinstance(x, str) else "")
def test_module_imports_only_the_layers_below(module, path):
    own = layer(module)
    allowed = MAY_USE[own] | {own}
    bad = sorted(name for name in imports(path) if layer(name) not in allowed | {None})
    assert not bad, f"{module} ({own}) imports {bad}; it may use {sorted(allowed)}"


@pytest.mark.parametrize("module,expected", [
    ("pdserve.base.config", "base"), ("pdserve.engine.host", "engine"), ("decode_worker.worker", "workers"),
    ("router.policies.dualmap", "router"), ("pdserve.sim.serving", "tools"), ("pdserve.client", "tools"),
    ("pdserve.cli", "root"), ("pdserve", "root"), ("numpy", None), ("pdservex", None),
])
def test_layer_of_a_module(module, expected):
    assert layer(module) == expected
