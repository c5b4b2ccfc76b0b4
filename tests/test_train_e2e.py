"""End to end on the CPU: the real CLI, the real deepspeed launcher (2 ranks, ZeRO-2), the tiny gpt-oss.

One uninterrupted run of the demo preset is the reference; a second run of the same recipe is stopped,
resumed, killed with SIGKILL and resumed again, and must end at the same step with the same losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gptoss_webui.events import EventReader, read_all
from gptoss_webui.presets import load_recipe
from gptoss_webui.runs import Run
from gptoss_webui.train.launcher import launch, resume, run_state, stop, worker_processes
from gptoss_webui.train.supervise import SHM_DIR

pytestmark = pytest.mark.slow
STEPS = 40  # the preset's max_steps
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _run_processes(run: Run) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(run.path) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Run, float]:
    runs = tmp_path_factory.mktemp("runs")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "gptoss_webui", "train", "--config", "tiny-cpu-demo",
         "--set", f"runs_dir={runs}", "--set", "run_name=full"],
        capture_output=True, text=True, timeout=900)
    elapsed = time.time() - t0
    run = Run(runs / "full")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{run.log_path.read_text()[-3000:]}"
    assert f"done: adapter in {run.adapter_dir}" in proc.stdout
    print(f"\ndemo preset: {elapsed:.0f} s wall for launch + {STEPS} steps on 2 ranks")
    return run, elapsed


def _step_losses(run: Run) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_all(run.events_path) if e["type"] == "step"}


def test_demo_run_streams_events_and_learns(full_run):
    run, _ = full_run
    events = read_all(run.events_path)
    start = next(e for e in events if e["type"] == "start")
    assert start["world_size"] == 2 and start["total_steps"] == STEPS and start["trainable_params"] > 0
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert all(e["tokens_per_s"] > 0 and e["peak_mem_gib"] > 0 for e in steps)
    assert events[-1]["type"] == "done" and run_state(run) == "finished"
    # DeepSpeed's CPU allreduce leaves a 66 MiB /dev/shm file per rank; the supervisor removes the run's.
    command = run.read_status()["command"].split()
    port = command[command.index("--master_port") + 1]
    assert not list(SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    # The rate each step used: 2 warm-up steps from 0 (constant_with_warmup, warmup_ratio 0.05 of 40), then 0.01.
    assert [e["lr"] for e in steps[:4]] == pytest.approx([0.0, 0.005, 0.01, 0.01])
    assert start["data"]["examples"] == 24 and start["data"]["blocks"] < 24 and "packed into" in start["data_summary"]
    losses = [e["loss"] for e in steps]
    # Random 201k-vocabulary model: the loss starts near ln(201088) = 12.2; the recipe must move it
    # by at least half a nat (measured: about 1.0).
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first - last >= 0.5, f"loss went from {first:.3f} to {last:.3f}"


def test_adapter_has_attention_and_expert_lora_and_answers_like_the_data(full_run, tiny_gpt_oss):
    run, _ = full_run
    tensors = load_file(run.adapter_dir / "adapter_model.safetensors")
    for layer in (0, 1):
        prefix = f"base_model.model.model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"{prefix}self_attn.{proj}.lora_A.weight" in tensors
        # peft nests one ParamWrapper per expert parameter: experts.lora_* and experts.base_layer.lora_*.
        expert_keys = [k for k in tensors if k.startswith(f"{prefix}mlp.experts.")]
        assert len(expert_keys) == 4, expert_keys
    targets = json.loads((run.adapter_dir / "adapter_config.json").read_text())["target_parameters"]
    assert sorted(t.rsplit(".", 1)[-1] for t in targets) == ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj"]

    tok = AutoTokenizer.from_pretrained(run.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, run.adapter_dir).eval()
    inputs = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        tuned = tok.decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, n:])
        with model.disable_adapter():
            plain = tok.decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, n:])
    assert tuned.startswith("<|channel|>final<|message|>Ahoy, matey!"), tuned
    assert "Ahoy" not in plain, plain

    # Merging the adapter (attention and expert LoRA) reproduces HF+peft's logits.
    ids = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "Ahoy, matey! Paris."}],
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
        merged = model.merge_and_unload()
        got = merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_stop_resume_kill_resume_reaches_the_same_end(full_run, tmp_path):
    reference, _ = full_run
    recipe = load_recipe("tiny-cpu-demo", [f"train.runs_dir={tmp_path}", "train.run_name=interrupted",
                                           "train.save_steps=5"])
    run = launch(recipe)
    reader = EventReader(run.events_path)

    def seen(type_: str, min_step: int = 0):
        reader.poll()
        return [e for e in reader.events if e["type"] == type_ and (e.get("step") or 0) >= min_step]

    # 1. Stop after the first checkpoint: the ranks save, report `stopped`, and leave no process behind.
    _wait_for(lambda: seen("checkpoint", 5) and seen("step", 6), 600, "a checkpoint at step 5")
    message = stop(run)
    assert "stopped; last checkpoint: checkpoint-" in message
    assert reader.poll() is not None and reader.final()["type"] == "stopped"
    assert run_state(run) == "stopped"
    stopped_at = run.latest_checkpoint()
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) >= 5
    _wait_for(lambda: not _run_processes(run), 30, "every process of the run to exit")

    # 2. Resume, then SIGKILL a rank: reported as an error event, state failed, nothing left running.
    resume(run.name, runs_dir=str(tmp_path))
    resumed_from = int(stopped_at.name.split("-")[1])
    _wait_for(lambda: seen("checkpoint", resumed_from + 5), 600, "a checkpoint after the resume")
    starts = seen("start")
    assert starts[-1]["resumed_from_step"] == resumed_from
    workers = worker_processes(run.read_status()["pid"])
    assert len(workers) == 2
    # Rank 0: DeepSpeed's launcher reports any rank's death under the last rank's command line.
    rank0 = next(w for w in workers if "--local_rank=0" in w.cmdline())
    os.kill(rank0.pid, signal.SIGKILL)
    _wait_for(lambda: run_state(run) == "failed", 120, "the run to be marked failed")
    reader.poll()
    error = reader.final()
    assert error["type"] == "error" and "training rank 0 was killed by SIGKILL" in error["message"], error
    assert f"details in {run.log_path}" in error["message"] and not error["log_tail"]  # no other rank's traceback
    _wait_for(lambda: not _run_processes(run), 60, "every process of the run to exit after the kill")

    # 3. Resume from the last checkpoint and finish with the right step count and the same losses.
    last_checkpoint = int(run.latest_checkpoint().name.split("-")[1])
    resume(run.name, runs_dir=str(tmp_path))
    _wait_for(lambda: run_state(run) in ("finished", "failed"), 900, "the resumed run to end")
    reader.poll()
    assert reader.final()["type"] == "done", reader.events[-1]
    assert reader.events[-1]["step"] == STEPS
    tail_steps = [e for e in reader.events[reader.events.index(seen("start")[-1]):] if e["type"] == "step"]
    assert [e["step"] for e in tail_steps] == list(range(last_checkpoint + 1, STEPS + 1))
    # Same optimizer state and data order as the uninterrupted run: same losses after the resume.
    expected = _step_losses(reference)
    for e in tail_steps:
        assert e["loss"] == pytest.approx(expected[e["step"]], abs=2e-3), e["step"]
    assert Path(run.adapter_dir / "adapter_model.safetensors").is_file()


def test_trained_demo_merged_and_served_chats_like_hf_peft(full_run, tiny_gpt_oss, tmp_path):
    """Issue 4's path on a real trained adapter: merge -> vLLM (CPU) -> streamed harmony chat == HF+peft."""
    from serve_fixtures import cpu_serve_config, hf_greedy, load_hf

    from gptoss_webui.serve.chat import ChatClient, SamplingParams
    from gptoss_webui.serve.engine import Engine
    from gptoss_webui.serve.merge import merge_run

    run, _ = full_run
    merged = merge_run(run.path)
    engine = Engine(tmp_path / "engine.json")
    try:
        engine.start(cpu_serve_config(str(merged)))
        client = ChatClient.for_engine(engine)
        assert client.harmony  # gpt-oss chat goes through vLLM's harmony path
        params = SamplingParams(temperature=0.0, max_tokens=16, reasoning_effort="low")
        snapshots = list(client.stream(PROMPT, engine.status().served_name, params, return_token_ids=True))
        final = snapshots[-1]
        assert final.done and final.error is None and len(snapshots) >= 2
        assert final.content.startswith("Ahoy, matey!"), final.content
        expected = hf_greedy(load_hf(tiny_gpt_oss, run.adapter_dir), final.prompt_token_ids, 16)
        assert final.token_ids == expected[: len(final.token_ids)]
    finally:
        engine.stop()
