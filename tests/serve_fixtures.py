"""Helpers for the serve tests: real peft adapters on the demo models, HF reference generations.

Imported by tests/test_serve_*.py (pytest puts tests/ on sys.path). Everything here is real: peft
writes the adapters the way training does, HF transformers gives the reference greedy outputs.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from gptoss_webui.config import ServeConfig

# Plain o200k ids ("Hello world, this is ..."): a raw prompt, no chat template involved.
PROMPT_IDS = [13225, 2375, 11, 495, 382, 261, 1746]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def private_workspace(root: Path) -> Path:
    """A workspace of its own (engine.json, engine.log, uploads) that shares the built demo models and caches."""
    from gptoss_webui.paths import workspace_dir

    real = workspace_dir()
    root.mkdir(parents=True, exist_ok=True)
    for name in ("models", "cache"):
        if not (root / name).exists():
            (root / name).symlink_to(real / name, target_is_directory=True)
    return root


def make_adapter(base_dir: str | Path, out_dir: str | Path, *, experts: bool = False, scale: float = 0.5,
                 seed: int = 1, r: int = 8) -> Path:
    """A LoRA adapter saved with peft's save_pretrained. lora_B is random (scale 0 keeps peft's zero init,
    an adapter that changes nothing), so the adapter visibly changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=ATTENTION,
                        target_parameters=EXPERTS if experts else None)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and scale:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def load_hf(model_dir: str | Path, adapter: str | Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by HF transformers; stops at the model's eos like vLLM does."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_serve_config(model: str, **overrides) -> ServeConfig:
    """Small and quick on 2 cores: eager (30 s start instead of 76 s), fp32 so greedy ids match HF exactly."""
    fields = dict(model=model, max_model_len=512, cpu_kv_cache_gib=1, enforce_eager=True, dtype="float32",
                  port=free_port(), start_timeout_s=300)
    return ServeConfig(**{**fields, **overrides})


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        try:  # a zombie is dead for our purpose
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ")[-1].startswith("Z"):
                    continue
        except OSError:
            continue
        alive.append(pid)
    return alive


# A harmony reply loop: after "<|start|>assistant" the scripted model writes an analysis message over
# and over. Ids from the o200k_harmony vocabulary; the thought is "Arr me hearty".
HARMONY_LOOP = [173781, 200005, 35644, 200008, 8977, 668, 116488, 200007, 200006]
THOUGHT = "Arr me hearty"


def make_scripted_gpt_oss(out_dir: str | Path) -> Path:
    """The demo tiny gpt-oss, rewired so its greedy output follows HARMONY_LOOP (random weights otherwise).

    Each loop token gets a large embedding along its own orthonormal direction, and the lm_head row of
    its successor points the same way: the residual stream is dominated by the current token, so greedy
    decoding walks the loop (harmony structure a random model never produces), while everything else,
    including LoRA on attention and experts, still runs through the real weights.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from gptoss_webui.sources import resolve_model

    out_dir = Path(out_dir)
    shutil.copytree(resolve_model("demo:tiny-gpt-oss"), out_dir, ignore=shutil.ignore_patterns("BUILD.json"))
    weights = load_file(out_dir / "model.safetensors")
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(embed.shape[1], len(HARMONY_LOOP), generator=gen))
    for i, token in enumerate(HARMONY_LOOP):
        successor = HARMONY_LOOP[(i + 1) % len(HARMONY_LOOP)]
        embed[token] = 100.0 * basis[:, i]
        head[successor] = 10.0 * basis[:, i]
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
