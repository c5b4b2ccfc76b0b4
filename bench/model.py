"""gpt-oss-20b's architecture with random weights: built on the GPU, or saved as a checkpoint.

No download: the shapes follow ../shared/GPT-OSS-FACTS.md. transformers' GptOssConfig() defaults are the
120b values (36 layers, 128 experts), so every 20b field is set here explicitly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PAD_ID, EOS_ID, BOS_ID = 199_999, 200_002, 199_998  # <|endoftext|>, <|return|>, <|startoftext|>


def gpt_oss_20b_config(layers: int = 24, experts: int = 32, hidden: int = 2880, heads: int = 64,
                       kv_heads: int = 8, head_dim: int = 64):
    """The real 20b config; smaller values are only for CPU smoke tests of this code."""
    from transformers import GptOssConfig

    return GptOssConfig(
        num_hidden_layers=layers, num_local_experts=experts, num_experts_per_tok=4, vocab_size=201_088,
        hidden_size=hidden, intermediate_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, sliding_window=128, attention_bias=True, tie_word_embeddings=False,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        max_position_embeddings=131_072, router_aux_loss_coef=0.9, swiglu_limit=7.0,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, use_cache=False,
    )


def build_random_model(config, attention: str, device: str, dtype: torch.dtype = torch.bfloat16):
    """Random weights allocated directly on `device` (41.8 GB in bf16 for the real shape: no CPU copy)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    return model


def save_random_checkpoint(out_dir: Path, tokenizer_dir: Path, config=None, device: str = "cuda") -> Path:
    """A bf16 safetensors checkpoint plus the o200k_harmony tokenizer files, loadable by the worker."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_random_model(config or gpt_oss_20b_config(), "eager", device)
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    cfg = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    cfg.pop("attn_implementation", None)  # let the worker's choose_attention decide
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return out_dir
