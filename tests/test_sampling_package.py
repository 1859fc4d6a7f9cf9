"""The shape of lisa_fused/sampling/: every name that the repo uses or documents still imports from the
package, each module stays readable in one sitting (<= 300 lines), and the modules import each other
without a cycle. The samplers' behaviour is tested in tests/test_sampling.py."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lisa_fused.sampling as S

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lisa_fused" / "sampling"
MAX_LINES = 300

# What lisa_fused/sampling.py offered before it became a package and what the repo reads from it
# (optimizer.py, validation.py, cli.py, tests/, docs/usage.md), with the module that now defines each; and
# what was added since (draw_active, trainable.py: blocks with nothing to train, issue 30).
PUBLIC = {
    "SAMPLERS": "registry", "ADAPTIVE_SAMPLERS": "registry", "SAMPLER_NAMES": "registry",
    "build_sampler": "registry",
    "SamplerOptions": "options",
    "Sampler": "base", "SamplerFn": "base", "checked_draw": "base", "uniform": "base",
    "UniformSampler": "base", "CallableSampler": "base", "sync_generator_from_rank0": "base",
    "draw_active": "base",
    "trainable_blocks": "trainable", "announce": "trainable", "check_saved_active": "trainable",
    "WeightNormSampler": "weight_norm", "weight_norm_sampler": "weight_norm",
    "GradNormSampler": "grad_norm", "GradNormMeter": "grad_norm",
    "OutlierSampler": "outlier", "block_outlier_ratios": "outlier",
    "LossFeedbackSampler": "loss_feedback",
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_public_name_imports_from_the_package_and_is_the_defining_modules_object(name):
    exec(f"from lisa_fused.sampling import {name}", {})
    module = getattr(S, PUBLIC[name])  # the submodule, e.g. lisa_fused.sampling.grad_norm
    # One object, not a copy: optimizer.py's isinstance(sampler, sampling.GradNormSampler) relies on it.
    assert getattr(S, name) is getattr(module, name)
    assert name in S.__all__


def test_all_lists_exactly_the_public_names():
    assert sorted(S.__all__) == sorted(PUBLIC)
    assert len(S.__all__) == len(set(S.__all__))


def _uses_in_repo() -> dict[str, set[str]]:
    """{name: files} for every `sampling.NAME`, `from ...sampling import NAME` and `ALIAS.NAME` (after
    `import sampling as ALIAS`) in the repo's Python and Markdown files outside the package and this test."""
    files = [p for d in ("lisa_fused", "tests", "benchmarks", "examples", "docs") for p in (ROOT / d).rglob("*")
             if p.suffix in (".py", ".md") and PACKAGE not in p.parents and p != Path(__file__).resolve()]
    files.append(ROOT / "README.md")
    uses: dict[str, set[str]] = {}
    for path in files:
        text = path.read_text(encoding="utf-8")
        names = set(re.findall(r"\bsampling\.([A-Za-z_]\w*)", text)) - {"py"}  # "sampling.py" is prose
        for paren, line in re.findall(r"from\s+(?:lisa_fused\.|\.+)sampling\s+import\s+(?:\(([^)]*)\)|([^\n#]+))",
                                      text):
            names |= {part.split(" as ")[0].strip() for part in (paren or line).split(",") if part.strip()}
        for alias in re.findall(r"import\s+sampling\s+as\s+(\w+)", text):
            names |= set(re.findall(rf"\b{alias}\.([A-Za-z_]\w*)", text))
        for n in names:
            uses.setdefault(n, set()).add(str(path.relative_to(ROOT)))
    return uses


def test_every_name_the_repo_reads_from_sampling_is_exported():
    uses = _uses_in_repo()
    # The scan must see today's known readers, or it proves nothing.
    assert "lisa_fused/optimizer.py" in uses["GradNormMeter"] and "lisa_fused/cli.py" in uses["SAMPLER_NAMES"]
    assert "tests/test_sampling.py" in uses["block_outlier_ratios"]
    missing = {n: sorted(f) for n, f in uses.items() if n not in S.__all__}
    assert not missing, f"names read from lisa_fused.sampling but not in its __all__: {missing}"


def test_no_module_in_the_package_is_over_300_lines():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    assert {"__init__.py", "options.py", "base.py", "registry.py"} <= set(sizes)
    too_long = {n: k for n, k in sizes.items() if k > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}; split them"


def test_the_package_modules_import_each_other_without_a_cycle():
    deps = {}
    for p in PACKAGE.glob("*.py"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        # `from .x import ...` (level 1) inside the package; `from ..layers` leaves it.
        deps[p.stem] = {node.module for node in ast.walk(tree)
                        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
    assert deps["registry"] >= {"base", "options", "grad_norm", "outlier", "loss_feedback", "weight_norm"}
    done: set[str] = set()

    def visit(mod, path):
        assert mod not in path, f"import cycle in lisa_fused/sampling: {' -> '.join(path + [mod])}"
        if mod in done:
            return
        for dep in deps.get(mod, ()):
            visit(dep, path + [mod])
        done.add(mod)

    for mod in deps:
        visit(mod, [])
