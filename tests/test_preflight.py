"""Bad input is refused before anything launches, with a message that says what to change."""

from __future__ import annotations

import json

import pytest

from gptoss_webui.presets import load_recipe
from gptoss_webui.train.attention import AttentionError, choose_attention
from gptoss_webui.train.data import DataError
from gptoss_webui.train.launcher import LaunchError, launch
from gptoss_webui.train.lora import LoraTargetError


def _launch(tmp_path, *overrides: str):
    recipe = load_recipe("tiny-cpu-demo", [f"train.runs_dir={tmp_path / 'runs'}", *overrides])
    return launch(recipe)


@pytest.mark.parametrize(("overrides", "error", "expected"), [
    (["train.model=/nonexistent/model"], LaunchError,
     r"model not found: '/nonexistent/model' is neither a local folder nor a model in the Hugging Face cache"),
    (["train.lora.target_modules=[q_proj,query]"], LoraTargetError,
     r"unknown LoRA target module\(s\) \['query'\]; this model's linear modules are: .*k_proj, o_proj, q_proj"),
    (["train.lora.expert_parameters=[up_proj]"], LoraTargetError,
     r"unknown expert parameter\(s\) \['up_proj'\]; this model has: down_proj, gate_up_proj"),
    (["train.lora.expert_layers=[5]"], LoraTargetError, r"lora.expert_layers \[5\] out of range: .*0..1"),
    (["train.lora.target_modules=[]", "train.lora.expert_parameters=[]"], LoraTargetError, "nothing to train"),
    (["train.precision=fp16"], LaunchError, r"precision=fp16 is refused for gpt-oss: fp16 overflows"),
    (["train.attention=flash_attention_2"], AttentionError, r"FlashAttention 2 has no attention sinks"),
    (["train.attention=sdpa"], AttentionError, r"attention=sdpa is refused by transformers for gpt-oss"),
    (["train.attention=flex_attention"], AttentionError, r"runs only on a GPU"),
    (["train.deepspeed.offload_optimizer=true"], LaunchError, r"on a CPU-only host there is nothing to offload"),
    (["train.hostfile=/nonexistent/hostfile"], LaunchError, r"hostfile not found"),
    (["train.data.path=/nonexistent/data.jsonl"], DataError, r"dataset file not found: /nonexistent/data.jsonl"),
    (["train.gpu_memory_gib=2"], LaunchError,
     r"(?s)does not fit: needs .* GiB per GPU, .* GiB over a 2.0 GiB card.*--force"),
])
def test_refused_before_launch(tmp_path, overrides, error, expected):
    with pytest.raises(error, match=expected):
        _launch(tmp_path, *overrides)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), "no run folder left"


def test_expert_parameters_on_a_dense_model_are_explained(tmp_path):
    expected = "has no fused expert parameters .* set lora.expert_parameters=\\[\\]"
    with pytest.raises(LoraTargetError, match=expected):
        _launch(tmp_path, "train.model=demo:tiny-dense")


def test_wrong_schema_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl line 1: the last message must be the assistant's answer"):
        _launch(tmp_path, f"train.data.path={bad}")


def test_a_taken_run_folder_is_refused(tmp_path):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="run folder .*mine already exists: pick another run_name, resume"):
        _launch(tmp_path, "train.run_name=mine", "train.optim.max_steps=1")


def test_an_unwritable_runs_folder_is_one_line_in_the_cli(tmp_path, monkeypatch, capsys):
    """Tried as an unprivileged user, this was a PermissionError traceback. The tests may run as root, whom file
    modes do not stop, so the refusal is the operating system's error raised where mkdir meets it."""
    from pathlib import Path

    from gptoss_webui.cli import main

    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main(["train", "--config", "tiny-cpu-demo", "--set", f"runs_dir={tmp_path / 'locked'}",
                 "--detach"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot create the runs folder {tmp_path / 'locked'}: permission denied; give one" in err


def test_a_second_training_beside_a_running_one_is_refused_without_the_queue(tmp_path):
    import os

    from gptoss_webui.runs import RunsDir

    other = RunsDir(tmp_path / "runs").create("first")
    other.config_path.write_text("train: {}\n")
    other.write_status(state="running", pid=os.getpid(), pgid=os.getpid())  # a live process, from before the ledger
    with pytest.raises(LaunchError, match=r"GPUs 0,1 are taken by run first \(GPUs 0,1\): two jobs on one GPU run "
                                          r"out of memory part way.*without --no-queue to wait in line"):
        launch(load_recipe("tiny-cpu-demo", [f"train.runs_dir={tmp_path / 'runs'}"]), wait_in_queue=False)


def test_memory_held_by_other_processes_on_the_chosen_gpus_is_named():
    from gptoss_webui.hardware import Gpu
    from gptoss_webui.train.launcher import busy_gpu_message

    found = [Gpu(0, "H100", 79.2, 70.1), Gpu(1, "H100", 79.2, 0.5)]
    assert busy_gpu_message(found, [1], 43.0) is None
    message = str(busy_gpu_message(found, [0, 1], 43.0))
    assert message.startswith("GPU 0 (H100) has 9.1 GiB free of 79.2: other processes hold 70.1 GiB")
    assert "this run needs 43.0 GiB" in message and "--force" in message


def test_auto_attention_per_device_and_architecture():
    assert choose_attention("auto", "gpt_oss", on_gpu=True) == "flex_attention"
    assert choose_attention("auto", "gpt_oss", on_gpu=False) == "eager"
    assert choose_attention("auto", "llama", on_gpu=False) == "sdpa"
    assert choose_attention("eager", "gpt_oss", on_gpu=True) == "eager"


def test_cli_prints_refusals_as_one_clear_error_without_a_traceback(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gptoss_webui", "train", "--config", "tiny-cpu-demo",
                           "--set", "lora.target_modules=[nope]", "--set", f"runs_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: unknown LoRA target module(s) ['nope']; this model's linear modules are:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_visible_cards_are_the_ones_deepspeed_starts(monkeypatch, tmp_path):
    """DeepSpeed drops CUDA_VISIBLE_DEVICES when --num_gpus is given; the command names the visible cards."""
    from gptoss_webui.runs import Run
    from gptoss_webui.train import launcher

    cfg = load_recipe("gpt-oss-20b-1x24gb").train
    monkeypatch.setattr(launcher, "_has_gpu", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    cmd = launcher.deepspeed_command(Run(tmp_path), cfg)
    assert cmd[1:3] == ["--include", "localhost:3"] and "--num_gpus" not in cmd
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launcher.deepspeed_command(Run(tmp_path), cfg)[1:3] == ["--num_gpus", "1"]


def test_lora_and_attention_refusals_read_in_chinese(tmp_path):
    from gptoss_webui.messages import text

    with pytest.raises(LoraTargetError) as info:
        _launch(tmp_path, "train.lora.expert_layers=[5]")
    assert text(info.value, "zh") == "lora.expert_layers [5] 超出范围：模型的层为 0..1"
    with pytest.raises(AttentionError) as info:
        choose_attention("sdpa", "gpt_oss", on_gpu=True)
    assert text(info.value, "zh").startswith("transformers 不允许 gpt-oss 使用 attention=sdpa（注意力 sink）")


def test_offloaded_activations_beyond_the_host_memory_are_refused(tmp_path):
    """Pinned pages cannot be swapped out: activations offloaded past the machine's free memory would kill the run
    mid-step, so the launch says so first (the 20b's config, 8 ranks of 131,072 tokens: hundreds of GiB)."""
    import psutil

    from bench.model import gpt_oss_20b_config

    model = tmp_path / "gpt-oss-20b-shape"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**gpt_oss_20b_config().to_dict(),
                                                   "architectures": ["GptOssForCausalLM"]}))
    overrides = [f"train.model={model}", "train.gpu_memory_gib=1000", "train.num_gpus=8",
                 "train.data.max_length=131072", "train.precision=bf16", "train.offload_activations=true"]
    with pytest.raises(LaunchError, match=r"GiB of activations in pinned CPU memory \(8 rank\(s\)\).*turn "
                                          r"offload_activations off") as refused:
        _launch(tmp_path, *overrides)
    need = float(str(refused.value).split("keeps ")[1].split(" GiB")[0])
    assert need > 0.9 * psutil.virtual_memory().available / 2**30
