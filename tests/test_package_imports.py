"""lisa_fused/ has no import circle (issue 28): no module imports, at module level or inside a function, a
module that imports it back, directly or through others. Read from the source (ast), so it also covers
modules a run never imports (zero.py without DeepSpeed, the CUDA paths without a GPU)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lisa_fused"
EXTENSIONS = {"lisa_fused._C"}  # compiled by setup.py: a module of its own, not the package's __init__


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The lisa_fused modules `name` imports: `from X import y` is X.y where that is a module, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            elif node.module and node.module.split(".")[0] == "lisa_fused":
                base = node.module
            else:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in mods or full in EXTENSIONS else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "lisa_fused"}
    return {m for m in out if m in mods and m != name}


def test_no_module_in_lisa_fused_imports_one_that_imports_it_back():
    mods = _modules()
    deps = {name: _imports(name, path, mods) for name, path in mods.items()}
    # The scan must see known edges, or it proves nothing.
    assert "lisa_fused.kernels._tables" in deps["lisa_fused.kernels.quant"]
    assert "lisa_fused.kernels.contract" in deps["lisa_fused.kernels._tables"]
    assert "lisa_fused.zero_client" in deps["lisa_fused.engines"]  # (a function-level import)
    assert "lisa_fused" not in deps["lisa_fused.kernels.native"]  # (`from .. import _C` is the extension)
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        assert mod not in path, f"import circle in lisa_fused/: {' -> '.join(path[path.index(mod):] + [mod])}"
        if mod in done:
            return
        for dep in sorted(deps[mod]):
            visit(dep, path + [mod])
        done.add(mod)

    for mod in sorted(deps):
        visit(mod, [])
