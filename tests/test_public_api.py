"""The README and docs/*.md describe the code as it is: every Python name they document imports, the
keyword tables match the signatures, the `memory_stats()` keys they name exist, and every relative link
and repository path they give resolves.

What counts as documented: `from lisa_fused... import X` and `import lisa_fused...` anywhere in a file
(code blocks and inline code), dotted names `lisa_fused.x.Y`, `opt.method(` / `FusedLISA.attr`, the
`*_bytes` keys in a paragraph or code line that mentions `memory_stats`, the rows of the tables headed
`keyword | default | ...` (FusedLISA's constructor) and `option | default | used by | ...`
(SamplerOptions), markdown links `[..](target#anchor)` and paths under the repository's top folders.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_FOLDERS = ("lisa_fused", "tests", "benchmarks", "docs", "examples", "csrc", ".ci")

FROM_IMPORT = re.compile(r"\bfrom\s+(lisa_fused(?:\.\w+)*)\s+import\s+(\([^)]*\)|\w+(?:\s*,\s*\w+)*)")
PLAIN_IMPORT = re.compile(r"(?m)^\s*import\s+(lisa_fused(?:\.\w+)*)")
DOTTED = re.compile(r"(?<![\w./-])lisa_fused(?:\.\w+)+")
OPT_ATTR = re.compile(r"\bopt\.(\w+)\(|\bFusedLISA\.(\w+)")
BYTES_KEY = re.compile(r"[`\"'](\w+_bytes)[`\"']")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w.*/-]*)" % "|".join(map(re.escape, TOP_FOLDERS)))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def outside_code(text: str) -> list[str]:
    """The lines of `text` outside ``` fences (headings and links in code blocks do not count)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs and list items (blank line or a new `- ` item ends one) and single code lines."""
    out, cur, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append(" ".join(cur))
            cur = []
        elif fenced:
            out.append(line)
        elif not line.strip() or re.match(r"\s*[-*] |\s*\d+\. ", line):
            out.append(" ".join(cur))
            cur = [line]
        else:
            cur.append(line)
    out.append(" ".join(cur))
    return [p for p in out if p.strip()]


def documented_names(text: str) -> list[str]:
    """Dotted names (`lisa_fused.hf.LISACallback`) the text imports or mentions, first occurrence order."""
    names = []
    for module, imported in FROM_IMPORT.findall(text):
        for item in imported.strip("()").split(","):
            item = item.split("#")[0].split(" as ")[0].strip()
            if item:
                names.append(f"{module}.{item}")
    names += PLAIN_IMPORT.findall(text) + DOTTED.findall(text)
    return list(dict.fromkeys(names))


def import_error(dotted: str) -> str | None:
    """None when `dotted` is an importable module or an attribute chain below one, else why not."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if module_name == exc.name or module_name.startswith(f"{exc.name}."):
                continue  # not a module (or its parent is not): try it as an attribute of the parent
            return f"importing {module_name} fails: {exc}"
        except Exception as exc:  # a documented module that raises on import is the failure to report
            return f"importing {module_name} fails: {type(exc).__name__}: {exc}"
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                return f"{'.'.join(parts[:i])} has no attribute {attr!r}"
            obj = getattr(obj, attr)
        return None
    return f"no module {parts[0]!r}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in outside_code(path.read_text()):
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def link_errors(path: Path, text: str | None = None) -> list[str]:
    """Relative links of the markdown file `path` whose file (or heading anchor) does not exist."""
    errors = []
    for target in LINK.findall("\n".join(outside_code(path.read_text() if text is None else text))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            errors.append(f"{rel(path)} links to {target!r}: {file_part} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            errors.append(f"{rel(path)} links to {target!r}: {rel(dest)} has no heading with anchor #{anchor}")
    return list(dict.fromkeys(errors))


def path_errors(doc: Path, text: str) -> list[str]:
    """Repository paths named in `text` that do not exist (a module may be named without `.py`)."""
    errors = []
    for raw in REPO_PATH.findall(text):
        p = raw.rstrip(".,:;")
        found = any(ROOT.glob(p.rstrip("/"))) if "*" in p else (ROOT / p).exists() or (ROOT / f"{p}.py").exists()
        if not found:
            errors.append(f"{rel(doc)} names {p!r}, which does not exist in the repository")
    return list(dict.fromkeys(errors))


def tables(text: str, header: tuple[str, ...]) -> list[list[str]]:
    """Body rows (cells) of every markdown table whose first header cells are `header`."""
    rows, inside = [], False
    for line in outside_code(text):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            inside = False
        elif tuple(cells[:len(header)]) == header:
            inside = True
        elif inside and not set(line) <= set("|-: "):
            rows.append(cells)
    return rows


def first_literal(cell: str):
    """The value of the first `...` literal in a table cell; inspect's `empty` for '(required)'."""
    if cell.startswith("(required)"):
        return inspect.Parameter.empty
    m = re.search(r"`([^`]+)`", cell)
    if m is None:
        raise AssertionError(f"default cell {cell!r} has no `literal`")
    return ast.literal_eval(m.group(1))


def table_errors(doc: str, rows: list[list[str]], expected: dict[str, object], what: str,
                 complete: bool) -> list[str]:
    """Rows whose name is not in `expected` or whose default differs; missing names if `complete`."""
    errors, named = [], set()
    for cells in rows:
        name = cells[0].strip("`")
        named.add(name)
        if name not in expected:
            errors.append(f"{doc} documents {what} {name!r}, which does not exist")
            continue
        try:
            default = first_literal(cells[1])
        except (ValueError, SyntaxError, AssertionError) as exc:
            errors.append(f"{doc}: {what} {name!r}: unreadable default {cells[1]!r} ({exc})")
            continue
        if default != expected[name]:
            errors.append(f"{doc}: {what} {name!r} default documented as {default!r}, the code has {expected[name]!r}")
    if complete:
        errors += [f"{doc} does not document {what} {n!r}" for n in expected if n not in named]
    return errors


def cases(extract):
    return [pytest.param(doc, item, id=f"{doc.name}:{item}") for doc in DOCS for item in extract(doc.read_text())]


# ---------------------------------------------------------------------------------------------- tests
def test_the_docs_are_found_and_name_the_optimizer():
    assert (ROOT / "README.md") in DOCS and len(DOCS) > 1, DOCS
    assert "lisa_fused.FusedLISA" in documented_names((ROOT / "README.md").read_text())


@pytest.mark.parametrize("doc, name", cases(documented_names))
def test_documented_name_imports(doc, name):
    err = import_error(name)
    assert err is None, f"{rel(doc)} documents {name}, which does not import: {err}"


def _optimizer_attrs(text: str) -> list[str]:
    return list(dict.fromkeys(a or b for a, b in OPT_ATTR.findall(text)))


@pytest.mark.parametrize("doc, attr", cases(_optimizer_attrs))
def test_documented_optimizer_attribute_exists(doc, attr):
    from lisa_fused import FusedLISA

    assert hasattr(FusedLISA, attr), f"{rel(doc)} documents FusedLISA.{attr} / opt.{attr}(), which does not exist"


def _memory_keys(text: str) -> list[str]:
    return list(dict.fromkeys(k for p in paragraphs(text) if "memory_stats" in p for k in BYTES_KEY.findall(p)))


def test_documented_memory_stats_keys_exist():
    from helpers import MLPStack

    from lisa_fused import FusedLISA

    opt = FusedLISA(MLPStack(), n_active_layers=2, backend="torch")
    try:
        keys = set(opt.memory_stats())
    finally:
        opt.release()
    documented = {(doc, k) for doc in DOCS for k in _memory_keys(doc.read_text())}
    assert {k for _, k in documented} >= {"device_bytes", "host_bytes"}, documented  # the parser finds them
    missing = sorted(f"{rel(doc)}: {k}" for doc, k in documented if k not in keys)
    assert not missing, f"memory_stats() keys documented but not returned (it returns {sorted(keys)}): {missing}"


def test_keyword_tables_match_the_constructor():
    from lisa_fused import FusedLISA

    params = inspect.signature(FusedLISA.__init__).parameters
    expected = {n: p.default for n, p in params.items() if n != "self"}
    errors, seen = [], 0
    for doc in DOCS:
        rows = tables(doc.read_text(), ("keyword", "default"))
        seen += bool(rows)
        # README's table leaves out the positional `model`; a table that lists `model` must list all.
        complete_set = {n: d for n, d in expected.items() if n != "model" or any(r[0] == "`model`" for r in rows)}
        if rows:
            errors += table_errors(rel(doc), rows, complete_set, "FusedLISA keyword", complete=True)
    assert seen >= 2, "README.md and docs/usage.md should each have a `keyword | default | ...` table"
    assert not errors, "\n".join(errors)


def test_the_adamw_defaults_are_torchs():
    """Issue 30: FusedLISA(model, lr=...) in place of torch.optim.AdamW(model.parameters(), lr=...) keeps the
    other defaults (before: lr 1e-5 and weight_decay 0.0, silently dropping weight decay)."""
    import torch

    from helpers import MLPStack
    from lisa_fused import FusedLISA

    ours, torchs = (inspect.signature(c.__init__).parameters for c in (FusedLISA, torch.optim.AdamW))
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert ours[key].default == torchs[key].default, (key, ours[key].default, torchs[key].default)
    model, ref = MLPStack(n_layers=3), MLPStack(n_layers=3)
    opt, ropt = FusedLISA(model, n_active_layers=3, backend="torch"), torch.optim.AdamW(ref.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
        for m, o in ((model, opt), (ref, ropt)):
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    opt.release()


def test_sampler_options_table_matches_the_dataclass():
    from lisa_fused.sampling import SamplerOptions

    expected = {f.name: f.default for f in dataclasses.fields(SamplerOptions)}
    errors, seen = [], 0
    for doc in DOCS:
        rows = tables(doc.read_text(), ("option", "default", "used by"))
        seen += bool(rows)
        if rows:
            errors += table_errors(rel(doc), rows, expected, "sampler option", complete=True)
    assert seen >= 1, "docs/usage.md should have an `option | default | used by | ...` table"
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_relative_links_resolve(doc):
    errors = link_errors(doc)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_repository_paths_exist(doc):
    errors = path_errors(doc, doc.read_text())
    assert not errors, "\n".join(errors)


def test_readme_links_every_doc():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall((ROOT / "README.md").read_text())}
    missing = [rel(d) for d in DOCS[1:] if d.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


# The checks above can fail: each is shown a made-up name, link or value and must report it.
def test_checkers_report_made_up_names():
    text = ("```python\nfrom lisa_fused import FusedLISA, NoSuchOptimizer\n```\n"
            "see `lisa_fused.hf.NoSuchCallback` and `lisa_fused.no_such_module.X`")
    names = documented_names(text)
    assert names == ["lisa_fused.FusedLISA", "lisa_fused.NoSuchOptimizer", "lisa_fused.hf.NoSuchCallback",
                     "lisa_fused.no_such_module.X"], names
    assert import_error("lisa_fused.FusedLISA") is None
    assert "no attribute 'NoSuchOptimizer'" in import_error("lisa_fused.NoSuchOptimizer")
    assert "no attribute 'NoSuchCallback'" in import_error("lisa_fused.hf.NoSuchCallback")
    assert "no attribute 'no_such_module'" in import_error("lisa_fused.no_such_module.X")
    assert _optimizer_attrs("opt.memory_stats() and opt.no_such_method(x), FusedLISA.nope") == [
        "memory_stats", "no_such_method", "nope"]


def test_checkers_report_broken_links_paths_and_tables():
    doc = ROOT / "docs" / "usage.md"
    errors = link_errors(doc, "[a](no_such.md) [b](integration.md#no-such-heading) [c](usage.md) [d](https://x.y)")
    assert len(errors) == 2 and "no_such.md" in errors[0] and "#no-such-heading" in errors[1], errors
    assert path_errors(doc, "`lisa_fused/no_such.py`, `lisa_fused/optimizer.py`, `lisa_fused/kernels`") == [
        "docs/usage.md names 'lisa_fused/no_such.py', which does not exist in the repository"]
    rows = tables("| keyword | default | x |\n|---|---|---|\n| `lr` | `1e-4` | y |\n| `nope` | `1` | z |\n",
                  ("keyword", "default"))
    errors = table_errors("T", rows, {"lr": 1e-5, "eps": 1e-8}, "kw", complete=True)
    assert errors == ["T: kw 'lr' default documented as 0.0001, the code has 1e-05",
                      "T documents kw 'nope', which does not exist", "T does not document kw 'eps'"], errors
    assert _memory_keys("`memory_stats()` gives `device_bytes`.\n\nNot here: `peak_bytes`.") == ["device_bytes"]
