"""bench/unsloth_row.py without a GPU: a row per variant, whatever happens in its process."""

import importlib.util
import json

import pytest

from bench.unsloth_row import main


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="checks the rows of a failed import")
def test_a_row_and_a_log_per_variant_when_unsloth_is_missing(tmp_path):
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "none"), "--out", str(out), "--variant", "bf16", "4bit", "--fallback",
                 "--timeout-s", "120"]) == 0
    rows = json.loads((out / "bench_unsloth.json").read_text())["rows"]
    assert [(r["variant"], r["lora"]) for r in rows] == [("bf16", "preset"), ("bf16", "attn"), ("4bit", "preset"),
                                                          ("4bit", "attn")]
    for r in rows:
        assert r["status"] == "error: ModuleNotFoundError: No module named 'unsloth'" and r["stage"] == "import"
        assert r["setup"] == "unsloth" and r["seq"] == 4096 and r["log_tail"]
    assert rows[0]["env"]["UNSLOTH_MXFP4_KEEP_PACKED"] == "0" and rows[2]["env"]["UNSLOTH_MXFP4_KEEP_PACKED"] is None
    assert rows[0]["env"]["UNSLOTH_DISABLE_STATISTICS"] == "1" and rows[0]["env"]["HF_HUB_OFFLINE"] == "1"
    assert "Traceback" in (out / "unsloth_bf16.log").read_text()
    assert json.loads((out / "unsloth_4bit_attn.json").read_text())["lora"] == "attn"
