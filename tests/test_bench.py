"""``hf-optim bench``: the quick step-time table runs and reports every candidate (no timing assertions)."""

from __future__ import annotations

import json

from hf_optim.guide import bench, cli


def test_bench_json_has_a_row_per_candidate(capsys):
    assert cli.main(["bench", "--optims", "adamw,lion_8bit", "--numel", "64K", "--tensors", "2", "--steps", "2",
                     "--warmup", "1", "--json"]) == 0
    rows = {r["candidate"]: r for r in json.loads(capsys.readouterr().out)}
    assert {bench.BASELINE, "hf_optim adamw (auto)", "hf_optim lion_8bit (auto)"} <= set(rows)
    base, ours = rows[bench.BASELINE], rows["hf_optim adamw (auto)"]
    assert abs(ours["x_fused"] - ours["median_ms"] / base["median_ms"]) < 0.01 + 1e-3 * ours["x_fused"]
    for name in (bench.BASELINE, "hf_optim adamw (auto)", "hf_optim lion_8bit (auto)"):
        assert rows[name]["median_ms"] is not None, rows[name]["note"]
    assert all(r["median_ms"] > 0 for r in rows.values() if r["median_ms"] is not None)
    # peers of the same rules are found when installed, and run or say why not
    assert all(r["note"] == "" or r["note"].startswith("skipped:") for r in rows.values())


def test_make_shapes():
    assert bench.make_shapes(4_000_000, 8) == [(1953, 256)] * 8
    assert bench.make_shapes(100, 4) == [(1, 25)] * 4


def test_bench_table(capsys):
    assert cli.main(["bench", "--optims", "adamw", "--numel", "16K", "--tensors", "1", "--steps", "1",
                     "--no-peers", "--execution", "eager"]) == 0
    out = capsys.readouterr().out
    assert "x torch fused" in out and "hf_optim adamw (eager)" in out and "optimi" not in out
