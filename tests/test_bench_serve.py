"""bench/serve.py on the CPU: the smoke run drives the real vLLM CPU engine through every stage (two engine starts,
a hot-load, a merge with expert LoRA); the time budget skips what cannot start."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest

from bench.serve import Session, main, run_session

pytestmark = pytest.mark.slow


def test_smoke_measures_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.serve", "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench_serve.json").read_text())
    rows = {r["stage"]: r for r in data["rows"]}
    assert list(rows) == ["base", "hotload", "merged"]
    assert all(r["status"] == "ok" for r in rows.values()), data["rows"]
    assert rows["base"]["model"] == "tiny-dense" and rows["base"]["lora_enabled"]
    assert rows["hotload"]["model"] == "adp" and rows["hotload"]["hotload_s"] > 0
    assert rows["hotload"]["adapter_changed"], rows["hotload"]["check"]
    merged = rows["merged"]
    assert merged["merge_ok"] and not merged["merge_reused"] and merged["merge_s"] > 0
    assert merged["merge_max_abs_diff"] < 1e-4 and merged["adapter_effect"] > 1e-2
    assert not merged["lora_enabled"] and any("reused the merged model" in n for n in merged["notes"])
    for row in rows.values():
        assert row["out_tokens"] == 4 * 16  # ignore_eos: every request ran to its length
        assert row["out_tok_s"] > 0 and row["total_tok_s"] > row["out_tok_s"] and 0 < row["p50_s"] <= row["max_s"]
        assert row["ttft_s"] > 0 and row["chat_tokens"] == 16 and row["stream_tok_s"] > 0
    assert rows["base"]["start_s"] > 0 and merged["start_s"] > 0
    assert data["meta"]["device"] == "CPU" and data["meta"]["vllm"].startswith("vllm")
    assert sorted(p.name for p in out.iterdir()) == ["bench_serve.json", "bench_serve.md", "engine_base.log",
                                                     "engine_merged.log", "merge.log"]
    table = (out / "bench_serve.md").read_text()
    assert table.count("| ok |") == 3 and table in proc.stdout


def test_budget_skips_what_cannot_start(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path), "--budget-s", "1"]) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())["rows"]
    assert [(r["stage"], r["status"]) for r in rows] == [("base", "skipped (time budget)"),
                                                        ("hotload", "skipped (time budget)"),
                                                        ("merged", "skipped (time budget)")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_serve.json", "bench_serve.md"]


def test_a_failing_session_is_recorded_not_raised(tmp_path):
    rows = []
    session = Session("merged", ("merged",), "demo:tiny-gpt-oss", str(tmp_path / "no-adapter"))
    started = run_session(session, ["merged"], argparse.Namespace(out=tmp_path), tmp_path, lambda: math.inf, 0.0,
                          rows.append)
    assert started is None and len(rows) == 1
    assert rows[0]["status"].startswith("error: MergeError: ") and "not a LoRA adapter folder" in rows[0]["status"]
