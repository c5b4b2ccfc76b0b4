"""gpt-oss-20b's (and 120b's) architecture with random weights: built on the GPU, or saved as a checkpoint in the
released layout (MXFP4 experts).

No download: the shapes follow ../shared/GPT-OSS-FACTS.md. transformers' GptOssConfig() defaults are the
120b values (36 layers, 128 experts), so every 20b field is set here explicitly.
"""

from __future__ import annotations

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
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, use_cache=True,  # as released
    )


def gpt_oss_120b_config():
    """gpt-oss-120b: the 20b's width with 36 layers and 128 experts (GPT-OSS-FACTS.md)."""
    return gpt_oss_20b_config(layers=36, experts=128)


def build_random_model(config, attention: str, device: str, dtype: torch.dtype = torch.bfloat16,
                       base_weights: str = "bf16"):
    """Random weights allocated directly on `device`: all bf16 (41.8 GB for the real 20b shape), or with the
    experts in MXFP4 as the released checkpoint stores them (12.8 GiB), built by the worker's own assembly."""
    from transformers import AutoModelForCausalLM

    if base_weights == "mxfp4":
        from gptoss_webui.mxfp4 import random_checkpoint_tensors
        from gptoss_webui.train.weights import assemble_for_training

        tensors = dict(random_checkpoint_tensors(config, dtype, device))
        return assemble_for_training(config, tensors, dtype, attention, source="random weights")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    model.config.use_cache = False
    return model


def save_random_checkpoint(out_dir: Path, tokenizer_dir: Path, config, device: str = "cuda") -> Path:
    """A checkpoint in the released layout (MXFP4 experts, quantization_config) with random weights, plus the
    o200k_harmony tokenizer files: what users download, loadable by the worker, the merge and vLLM."""
    from gptoss_webui.mxfp4 import write_random_checkpoint

    out_dir = Path(out_dir)
    write_random_checkpoint(config, out_dir, torch.bfloat16, device)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir
