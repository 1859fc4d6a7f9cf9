"""`lisa-fused` answers --help and argument errors without importing torch; the torch-free name lists the
parser validates with equal the torch-side ones; lisa_fused.presets sits below bench and plan."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lisa_fused

PACKAGE_ROOT = Path(lisa_fused.__file__).resolve().parents[1]

# Run `argv` through the CLI in a fresh interpreter; print which heavy modules got imported (JSON).
CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import lisa_fused.cli
code = 0
try:
    lisa_fused.cli.main({argv!r})
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "loaded": sorted(m for m in {watched!r} if m in sys.modules)}}), file=sys.stderr)
"""
HEAVY = ("torch", "transformers", "peft", "numpy", "lisa_fused.optimizer", "lisa_fused.plan.planner",
         "lisa_fused.bench.methods", "lisa_fused.bench.models")


def _child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def _run_cli(argv: list[str], watched=HEAVY) -> tuple[int, list[str], subprocess.CompletedProcess]:
    proc = _child(CHILD.format(root=str(PACKAGE_ROOT), argv=argv, watched=watched))
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    return result["code"], result["loaded"], proc


@pytest.mark.parametrize("argv,code,text", [
    (["--help"], 0, "FusedLISA tools."),
    (["--version"], 0, "lisa-fused 0.1.0"),
    (["plan", "--help"], 0, "gemma-2-9b, llama-2-7b"),
    (["bench", "--help"], 0, "--switch-every"),
    (["plan", "--gpu-mem", "banana", "llama-3-8b"], 2, "--gpu-mem: 'banana': not a size"),
    (["bench", "--methods", "full,adam"], 2, "unknown method 'adam'"),
    (["bench", "--methods", "peers,adam"], 2, "unknown method 'adam'"),
    (["bench", "--samplers", "uniform,nope"], 2, "unknown sampler 'nope'"),
    (["bench", "--preset", "llama-3-70b"], 2, "invalid choice: 'llama-3-70b'"),
    ([], 2, "required: COMMAND"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_help_and_argument_errors_import_no_torch(argv, code, text):
    got, loaded, proc = _run_cli(argv)
    assert got == code, proc.stderr[-2000:]
    assert text in proc.stdout + proc.stderr
    assert loaded == [], f"`lisa-fused {' '.join(argv)}` imported {loaded} before answering"


def test_a_plan_without_lora_rows_imports_no_peft():
    code, loaded, proc = _run_cli(["plan", "tiny", "--methods", "full,lisa", "--seq-len", "16"],
                                  watched=("torch", "peft", "lisa_fused.bench.methods"))
    assert code == 0 and "| lisa " in proc.stdout, proc.stderr[-2000:]
    assert loaded == ["torch"], loaded


def test_importing_lisa_fused_cli_imports_no_torch_and_fusedlisa_still_imports():
    proc = _child(f"import sys; sys.path.insert(0, {str(PACKAGE_ROOT)!r}); import lisa_fused, lisa_fused.cli\n"
                  "assert 'torch' not in sys.modules, 'import lisa_fused.cli imported torch'\n"
                  "from lisa_fused import FusedLISA\n"
                  "import torch\n"
                  "assert issubclass(FusedLISA, torch.optim.Optimizer) and 'FusedLISA' in dir(lisa_fused)\n"
                  "try:\n    lisa_fused.NoSuchName\nexcept AttributeError as exc:\n    print(exc)\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "has no attribute 'NoSuchName'" in proc.stdout


def test_presets_import_neither_bench_nor_plan_nor_torch():
    proc = _child(f"import sys; sys.path.insert(0, {str(PACKAGE_ROOT)!r}); import lisa_fused.presets\n"
                  "print(sorted(m for m in sys.modules if m.startswith(('lisa_fused.bench', 'lisa_fused.plan')) "
                  "or m in ('torch', 'transformers')))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_torch_free_name_lists_equal_the_torch_side_ones():
    from lisa_fused import cli, presets, sampling
    from lisa_fused.bench import data, methods, models

    assert cli.SAMPLER_NAMES == sampling.SAMPLER_NAMES
    assert sorted(set(cli.PLAN_DTYPES.values())) == sorted(models.DTYPES)  # the bench's --dtype choices
    assert methods.METHODS is lisa_fused.bench.METHODS and methods.DEFAULT_METHODS is lisa_fused.bench.DEFAULT_METHODS
    assert (data.BOS, data.EOS, data.PAD, data.BYTE_VOCAB) == (presets.BOS, presets.EOS, presets.PAD, presets.BYTE_VOCAB)


def test_old_preset_names_still_import():
    from lisa_fused import plan, presets
    from lisa_fused.bench.models import ALIASES, PRESET_DEFAULTS, PRESETS, TINY
    from lisa_fused.plan.models import PRESETS as PLAN_PRESETS, preset_names

    assert plan.PRESETS is PLAN_PRESETS is presets.PUBLISHED
    assert PRESETS == ("tiny", *sorted(plan.PRESETS)) and set(PRESET_DEFAULTS) == {*PRESETS, *ALIASES}
    assert TINY["vocab_size"] == presets.BYTE_VOCAB and preset_names() == [*sorted(plan.PRESETS), "tiny"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        plan.nope  # noqa: B018


def test_bench_and_plan_build_the_same_preset_configs():
    """The bench's config is the planner's plus the byte-token ids (tiny has them in both)."""
    from lisa_fused import presets
    from lisa_fused.bench.models import model_config
    from lisa_fused.plan import load_config

    for name in presets.names():
        bench, planned = model_config(name, None).to_dict(), load_config(name).to_dict()
        assert {k: v for k, v in bench.items() if k not in presets.BYTE_TOKEN_IDS} == \
            {k: v for k, v in planned.items() if k not in presets.BYTE_TOKEN_IDS}, name
        assert {k: bench[k] for k in presets.BYTE_TOKEN_IDS} == presets.BYTE_TOKEN_IDS, name
    assert load_config("tiny").vocab_size == presets.BYTE_VOCAB and load_config("tiny").eos_token_id == presets.EOS
    assert model_config("llama-1b", None).to_dict() == model_config("llama-3.2-1b", None).to_dict()
    with pytest.raises(KeyError, match="preset 'llama-3-70b': choose from"):
        presets.spec("llama-3-70b")
