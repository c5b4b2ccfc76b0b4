"""End to end on the CPU for the other ways to train: the real CLI and deepspeed launcher, 2 ranks, the tiny gpt-oss.

- MXFP4-resident experts: the tiny gpt-oss in the released layout trains with its experts kept as codes, and the
  adapter merges through the CLI into a model that reproduces HF+peft's logits.
- ZeRO-3 with expert LoRA: an uninterrupted run is the reference; a second run is stopped after a checkpoint and
  resumed, and must finish with the same losses.
- Activation offload: the saved tensors in CPU memory change where they wait, not the losses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from gptoss_webui.events import EventReader, read_all
from gptoss_webui.presets import load_recipe
from gptoss_webui.runs import Run
from gptoss_webui.train.launcher import launch, resume, run_state, stop

pytestmark = pytest.mark.slow


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptoss_webui", *args], capture_output=True, text=True,
                          timeout=timeout)


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_mxfp4_experts_train_and_merge_through_the_cli(tmp_path):
    proc = _cli("train", "--config", "tiny-cpu-demo", "--set", "model=demo:tiny-gpt-oss-mxfp4",
                "--set", "base_weights=mxfp4", "--set", "optim.max_steps=4", "--set", "save_steps=2",
                "--set", f"runs_dir={tmp_path}", "--set", "run_name=mx")
    run = Run(tmp_path / "mx")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{run.log_path.read_text()[-3000:]}"
    events = read_all(run.events_path)
    start = next(e for e in events if e["type"] == "start")
    assert (start["base_weights"], start["base_weights_note"], start["world_size"]) == ("mxfp4", "", 2)
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4] and events[-1]["type"] == "done"
    tensors = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight" in tensors

    merged = _cli("merge", "--run", str(run.path))
    assert merged.returncode == 0, merged.stdout + merged.stderr
    provenance = json.loads((run.merged_dir / "merged_from.json").read_text())
    assert provenance["ok"] and provenance["adapter_effect"] > 0
    assert provenance["experts"].startswith("float32 (the adapter changes the experts")
    assert "quantization_config" not in json.loads((run.merged_dir / "config.json").read_text())


ZERO3 = ["train.deepspeed.stage=3", "train.optim.max_steps=8", "train.save_steps=4"]


def test_zero3_with_expert_lora_stops_resumes_and_matches(tmp_path):
    reference = _cli("train", "--config", "tiny-cpu-demo", *(a for s in ZERO3 for a in ("--set", s[6:])),
                     "--set", f"runs_dir={tmp_path}", "--set", "run_name=z3ref")
    ref_run = Run(tmp_path / "z3ref")
    assert reference.returncode == 0, f"{reference.stdout}\n{ref_run.log_path.read_text()[-3000:]}"
    ref_events = read_all(ref_run.events_path)
    start = next(e for e in ref_events if e["type"] == "start")
    assert start["config"]["zero_stage"] == 3 and start["world_size"] == 2
    assert len(load_file(ref_run.adapter_dir / "adapter_model.safetensors")) == 24  # 16 attention + 8 expert
    expected = {e["step"]: e["loss"] for e in ref_events if e["type"] == "step"}

    run = launch(load_recipe("tiny-cpu-demo", [*ZERO3, f"train.runs_dir={tmp_path}", "train.run_name=z3"]))
    reader = EventReader(run.events_path)

    def seen(type_: str, min_step: int = 0):
        reader.poll()
        return [e for e in reader.events if e["type"] == type_ and (e.get("step") or 0) >= min_step]

    _wait_for(lambda: seen("checkpoint", 4) and seen("step", 5), 600, "a checkpoint at step 4")
    assert "stopped; last checkpoint: checkpoint-" in stop(run)
    resumed_from = int(run.latest_checkpoint().name.split("-")[1])
    assert resumed_from < 8
    resume(run.name, runs_dir=str(tmp_path))
    _wait_for(lambda: run_state(run) in ("finished", "failed"), 900, "the resumed run to end")
    reader.poll()
    assert reader.final()["type"] == "done", reader.events[-1]
    assert seen("start")[-1]["resumed_from_step"] == resumed_from
    tail = [e for e in reader.events[reader.events.index(seen("start")[-1]):] if e["type"] == "step"]
    assert [e["step"] for e in tail] == list(range(resumed_from + 1, 9))
    for e in tail:
        assert e["loss"] == pytest.approx(expected[e["step"]], abs=2e-3), e["step"]


def test_offloaded_activations_train_with_the_same_losses(tmp_path):
    losses = {}
    for name, flag in (("kept", "false"), ("offloaded", "true")):
        proc = _cli("train", "--config", "tiny-cpu-demo", "--set", "optim.max_steps=3", "--set", "save_steps=10",
                    "--set", f"offload_activations={flag}", "--set", f"runs_dir={tmp_path}",
                    "--set", f"run_name={name}")
        run = Run(tmp_path / name)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
        events = read_all(run.events_path)
        assert next(e for e in events if e["type"] == "start")["config"]["offload_activations"] is (flag == "true")
        losses[name] = [e["loss"] for e in events if e["type"] == "step"]
    assert len(losses["offloaded"]) == 3 and losses["offloaded"] == pytest.approx(losses["kept"], abs=1e-6)
