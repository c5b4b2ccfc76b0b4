"""bench/cookbook.py on the CPU: the synthetic rows have the stated lengths, and a run through the real CLI (on the
tiny demo model, CPU overrides) yields every phase."""

from __future__ import annotations

import json
import statistics

from transformers import AutoTokenizer

from bench.cookbook import main, rows
from gptoss_webui.sources import resolve_model

CPU = ["model=demo:tiny-gpt-oss", "precision=fp32", "compile=false", "num_gpus=2", "gpu_memory_gib=null",
       "lora.expert_layers=[1]", "optim.micro_batch_size=1", "optim.gradient_accumulation_steps=1", "save_steps=3"]


def test_rows_follow_the_stated_length_distribution():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("demo:tiny-gpt-oss"))
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows(300)]
    assert 1000 < statistics.median(lengths) < 1250 and min(lengths) > 150 and max(lengths) < 4200


def test_a_run_reports_every_phase(tmp_path, monkeypatch, tiny_gpt_oss):
    data = tmp_path / "rows.jsonl"
    monkeypatch.setattr("sys.argv", ["cookbook", "rows", "--out", str(data), "--count", "12"])
    main()
    sets = [a for s in CPU for a in ("--set", s)]
    monkeypatch.setattr("sys.argv", ["cookbook", "run", "--model", "demo:tiny-gpt-oss", "--rows", str(data),
                                     "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), *sets])
    main()
    result = json.loads((tmp_path / "out" / "cookbook.json").read_text())
    assert result["exit"] == 0 and result["final"] == "done", result
    assert result["data"]["examples"] == 12 and result["data"]["blocks"] < 12
    assert result["steps"] >= 2 and result["saves"] >= 1
    for phase in ("setup_s", "first_step_s", "steps_s", "saves_s", "final_save_s", "launch_to_adapter_s"):
        assert result[phase] >= 0, phase
    assert result["launch_to_adapter_s"] > result["setup_s"] + result["steps_s"]
