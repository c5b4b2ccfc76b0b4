"""The embedded default: a tiny gpt-oss with random weights, the real o200k_harmony tokenizer, demo data.

Everything is built offline and deterministically (seeded), with the tokenizer of gptoss_webui.tokenizer.
Builds are cached under the workspace and rebuilt when a file is missing or its checksum does not match.
Names usable wherever a model or dataset path is expected (gptoss_webui.sources turns them into paths):
  demo:tiny-gpt-oss   GptOssForCausalLM, 2 layers (sliding + full), 4 experts, head_dim 32
  demo:tiny-gpt-oss-mxfp4  the same shape in the released checkpoints' layout: MXFP4 experts (random codes)
  demo:tiny-dense     LlamaForCausalLM of the same width and tokenizer (vLLM's CPU build runs LoRA on it)
  demo:harmony        the shipped demo dataset (harmony `messages`, some rows with `thinking`)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gptoss_webui.paths import workspace_dir
from gptoss_webui.sources import resolve_dataset
from gptoss_webui.tokenizer import VOCAB_SIZE, build_tokenizer, harmony_special_tokens, sha256

BUILD_VERSION = 2  # bump when the recipe below changes: cached builds are then rebuilt


@dataclass(frozen=True)
class TinyShape:
    architecture: str
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention needs >= 32
    experts: int = 4
    experts_per_token: int = 2
    intermediate_size: int = 64
    mxfp4: bool = False  # experts stored as the released checkpoints store them (blocks + scales)


DEMO_MODELS = {
    "tiny-gpt-oss": TinyShape("gpt_oss"),
    "tiny-gpt-oss-mxfp4": TinyShape("gpt_oss", mxfp4=True),
    "tiny-dense": TinyShape("llama", intermediate_size=128),
}
DEMO_DATASETS = {"harmony": "demo_harmony.jsonl"}


# --- tiny models -------------------------------------------------------------------------------

def _model_config(shape: TinyShape, specials: dict[str, int]):
    common = dict(
        vocab_size=VOCAB_SIZE, hidden_size=shape.hidden_size, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        intermediate_size=shape.intermediate_size, max_position_embeddings=4096,
        bos_token_id=specials["<|startoftext|>"], eos_token_id=specials["<|return|>"],
        pad_token_id=specials["<|endoftext|>"], initializer_range=0.02,
    )
    if shape.architecture == "gpt_oss":
        from transformers import GptOssConfig

        return GptOssConfig(
            **common, num_local_experts=shape.experts, num_experts_per_tok=shape.experts_per_token,
            layer_types=["sliding_attention", "full_attention"][: shape.layers], sliding_window=128,
            tie_word_embeddings=False, use_cache=True,
            rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096,
                             "rope_theta": 150000.0},
        )
    from transformers import LlamaConfig

    return LlamaConfig(**common, tie_word_embeddings=True, rope_theta=150000.0)


def build_model(name: str, out_dir: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    shape = DEMO_MODELS[name]
    config = _model_config(shape, harmony_special_tokens())
    if shape.mxfp4:
        from gptoss_webui.mxfp4 import write_random_checkpoint

        write_random_checkpoint(config, out_dir, dtype=torch.float32, seed=seed)
        build_tokenizer(out_dir)
        return
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(".sinks"):
                # Sinks large enough to matter, so attention tests would notice them being ignored.
                param.normal_(0.0, 1.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(out_dir)


# --- cache ---------------------------------------------------------------------------------------

def _manifest(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p.read_bytes()) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "BUILD.json"}


def _is_intact(folder: Path) -> bool:
    try:
        info = json.loads((folder / "BUILD.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("version") == BUILD_VERSION and info.get("files") == _manifest(folder)


def _share(folder: Path) -> None:
    """Readable by every user of the workspace: safetensors writes owner-only files."""
    for path in [folder, *folder.rglob("*")]:
        if path.stat().st_mode & 0o044 != 0o044 and os.access(path, os.W_OK):
            path.chmod(path.stat().st_mode | (0o055 if path.is_dir() else 0o044))


def ensure_demo_model(name: str) -> Path:
    """The folder of a demo model, built on first use and rebuilt if missing or corrupt."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model '{name}'; known: {', '.join(DEMO_MODELS)}")
    folder = workspace_dir() / "models" / name
    if _is_intact(folder):
        _share(folder)  # builds made before files were shared
        return folder
    tmp = folder.with_name(f".{name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_model(name, tmp)
    _share(tmp)
    (tmp / "BUILD.json").write_text(json.dumps({"version": BUILD_VERSION, "files": _manifest(tmp)}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def build_all() -> dict[str, str]:
    """What `python -m gptoss_webui demo` builds and prints."""
    out = {name: str(ensure_demo_model(name)) for name in DEMO_MODELS}
    out["tokenizer"] = out["tiny-gpt-oss"]
    out["dataset"] = resolve_dataset("demo:harmony")
    return out
