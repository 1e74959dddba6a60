"""tools/bench.py --tiny end to end on the CPU: the JSON's columns and sane values, the markdown table."""

from __future__ import annotations

import json

from tools.bench import BASELINE, COLUMNS, main


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    main(["--tiny", "--steps", "2", "--warmup", "1", "--micro-batch", "2", "--seq-len", "128", "--out", str(out)])
    result = json.loads((out / "bench.json").read_text())
    assert result["meta"]["baseline"] == BASELINE
    (row,) = result["rows"]
    assert set(COLUMNS) <= set(row)
    assert row["steps"] == 2 and row["micro_batch"] == 2
    assert row["tokens_per_s"] > 0 and row["samples_per_s"] > 0
    assert 0 <= row["padding"] < 1
    assert 0 < row["mfu"] <= 1
    assert row["peak_mem_mib"] >= 0
    table = (out / "bench.md").read_text()
    assert "| qllava |" in table and BASELINE in table
    assert capsys.readouterr().out.rstrip().endswith(table.rstrip().splitlines()[-1])
