"""The bench report's first screen from a fixed results.json (tests/data/bench_peers_results.json): the
one-line summaries against lisa and the 120-column table, golden; the legend once; every line within 120
columns. The numbers in the fixture were chosen so that each summary wording shows: the same eval loss
(a difference within the seed std), worse, better, a BUSY row, a peer paging to the host, a skipped peer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lisa_fused.bench import report, summary

FIXTURE = Path(__file__).parent / "data" / "bench_peers_results.json"

SUMMARY = "\n".join([
    'lisa (the reference): eval loss 3.2350 ± 0.0050 over 3 runs, 5.36 MiB of optimizer bytes on the device (+ 6.14 MiB paged',
    '  to the host), 81.0 ms a step',
    'lisa-published: same eval loss (+0.1%), 2.1x the optimizer bytes on the device, 0.95x the step time',
    'badam: worse eval loss (+5.4%), 0.57x the optimizer bytes on the device, 0.86x the step time',
    'galore: better eval loss (-1.1%), 4.2x the optimizer bytes on the device, 3.1x the step time (BUSY: times not the',
    "  methods' own)",
    'adamw-8bit: better eval loss (-1.1%), 1.8x the optimizer bytes on the device, 2.2x the step time',
    'skipped adamw-8bit-bnb: bitsandbytes is not installed; pip install "bitsandbytes==0.50.2" (or every peer: pip install',
    '  "lisa_fused[peers]")',
])

TABLE = "\n".join([
    '| method         | runs |       eval loss |   dev MiB |  host MiB | peak MiB | step ms | opt ms |   trained | load |',
    '|----------------|------|-----------------|-----------|-----------|----------|---------|--------|-----------|------|',
    '| lisa           |    3 | 3.2350 ± 0.0050 | 5.36/5.36 | 6.14/6.14 |     51.8 |    81.0 |   3.10 |   468,352 | ok   |',
    '| lisa-published |    3 | 3.2390 ± 0.0026 | 11.3/11.3 |       0/0 |     55.0 |    77.0 |   9.20 |   468,352 | ok   |',
    '| badam          |    1 |          3.4100 | 3.07/3.07 |       0/0 |     40.1 |    70.0 |   6.00 |   200,960 | ok   |',
    '| galore         |    1 |          3.1990 | 22.7/22.7 |       0/0 |     70.2 |   250.0 |  96.50 | 1,674,112 | BUSY |',
    '| adamw-8bit     |    1 |          3.2010 | 9.90/9.90 |       0/0 |     58.0 |   180.0 |  60.25 | 1,674,112 | ok   |',
])


@pytest.fixture
def results():
    return json.loads(FIXTURE.read_text())


def test_summary_lines_and_table_are_golden(results):
    text = summary.format_summary(results["rows"], results["skipped"], results["failures"])
    head, table, legend = text.rstrip("\n").split("\n\n")
    assert head == SUMMARY
    assert table == TABLE
    assert legend == summary.format_legend()
    assert all(len(line) <= summary.WIDTH for line in text.splitlines()), max(text.splitlines(), key=len)


def test_legend_defines_every_column_once():
    names = [name for name, _ in summary.LEGEND]
    assert names == list(summary.COLUMNS)
    text = summary.format_legend()
    assert all(text.count(f"{n}: ") == 1 for n in names)


def test_summary_against_lisa_by_hand(results):
    methods = {m.name: m for m in summary.aggregate(results["rows"])}
    pub, lisa = methods["lisa-published"], methods["lisa"]
    assert pub.runs == 3 and pub.eval_mean == pytest.approx(3.239) and pub.eval_std == pytest.approx(0.0026458, rel=1e-4)
    assert pub.dev_peak / lisa.dev_peak == pytest.approx(2.102, rel=1e-3)  # "2.1x"
    assert methods["badam"].eval_std is None and lisa.peak_mem == int(51.8 * summary.MIB)  # from the run that measured it
    one_run = [dict(r, method=r["base_method"]) for r in results["rows"] if r["run_seed"] == 0]
    lisa1, pub1 = summary.aggregate(one_run)[:2]
    assert summary.summary_line(pub1, lisa1) == ("lisa-published: eval loss +0.2% (one run each: no spread to judge "
                                                 "by), 2.1x the optimizer bytes on the device, 0.95x the step time")


def test_no_lisa_row_says_so_and_ratio_formats():
    rows = [r for r in json.loads(FIXTURE.read_text())["rows"] if r["base_method"] == "badam"]
    assert summary.format_summary(rows).startswith("(no `lisa` row, so no line against it")
    assert [summary.ratio(a, 1) for a in (0.333, 0.95, 1.0, 2.14, 12.4)] == ["0.33x", "0.95x", "1.0x", "2.1x", "12x"]
    assert summary.ratio(1, 0) == "n/a"


def test_results_md_leads_with_the_first_screen(results, tmp_path):
    header = {"date": "2026-12-07T00:00:00+00:00", "command": "lisa-fused bench --methods peers", "device": "cpu",
              "load_avg": [0.5, 0.6], "cpu_count": 2, "python": "3.11", "torch": "2.13", "transformers": "5.24",
              "peft": "0.21", "lisa_fused": "0.1.0", "peer_versions": {"badam": "1.4"},
              "config": {"model": None, "preset": "tiny", "model_config": {}, "dtype": "float32",
                         "finetune_text": "t", "ft_train_tokens": 1, "ft_eval_tokens": 1, "tokens": "bytes",
                         "steps": 40, "batch_size": 4, "seq_len": 128, "seed": 0}}
    text = report.format_markdown(header, [], [], results["skipped"])
    assert "skipped adamw-8bit-bnb: bitsandbytes is not installed" in text and "badam 1.4" in text
