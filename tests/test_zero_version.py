"""lisa_fused/zero.py's version guard: FusedLISA under ZeRO 1-3 relies on DeepSpeed internals, so a
DeepSpeed outside the tested range (pyproject's [dist] pin) raises at deepspeed.initialize, naming the
installed version and the range."""
from __future__ import annotations

import pytest

from lisa_fused.zero import check_version


@pytest.mark.parametrize("version", ["0.19.8", "0.19.9", "0.19.12+cu128"])
def test_tested_range_passes(version):
    check_version(version)


@pytest.mark.parametrize("version", ["0.19.7", "0.20.0", "0.20.0rc1", "0.18.4", "1.0.0", "0.1.98"])
def test_outside_the_range_is_refused_naming_both(version):
    with pytest.raises(RuntimeError) as err:
        check_version(version)
    text = str(err.value)
    assert f"installed: deepspeed {version}" in text and "deepspeed >=0.19.8,<0.20" in text, text
    assert "pip install 'lisa-fused[dist]'" in text


def test_pin_matches_pyproject():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"deepspeed>=0.19.8,<0.20"' in text
