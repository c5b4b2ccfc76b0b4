"""A model's shapes, without loading it: layers, widths, experts, vocabulary, and the parameter counts that follow.

From a local config.json, the Hugging Face cache, the built-in gpt-oss tables (../shared/GPT-OSS-FACTS.md) or the
demo shapes (gptoss_webui.demo). Torch-free: the memory estimate (train/memory.py) and the merge's disk check
(serve/merge.py) read them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptoss_webui.config import ConfigError
from gptoss_webui.mxfp4 import is_mxfp4_config


class ArchitectureError(ConfigError):
    """The shapes cannot be known (unknown model, unreadable config.json): one clear line."""


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # per expert for MoE models
    vocab: int
    experts: int = 0  # 0 = dense MLP
    experts_per_token: int = 0
    attention_bias: bool = False
    tie_embeddings: bool = False
    mxfp4_experts: bool = False  # the checkpoint stores the expert weights in MXFP4 (as gpt-oss is released)

    @classmethod
    def from_config_json(cls, cfg: dict[str, Any]) -> Architecture:
        """From a Hugging Face config.json dict (gpt_oss, llama-like dense, mixtral-like MoE)."""
        try:
            model_type = str(cfg.get("model_type", ""))
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
            return cls(
                model_type=model_type,
                layers=int(cfg["num_hidden_layers"]),
                hidden=hidden,
                heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate=int(cfg["intermediate_size"]),
                vocab=int(cfg["vocab_size"]),
                experts=experts,
                experts_per_token=int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0)
                if experts else 0,
                attention_bias=bool(cfg.get("attention_bias", model_type == "gpt_oss")),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                mxfp4_experts=is_mxfp4_config(cfg),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArchitectureError(f"config.json lacks or mangles a field the estimate needs: {exc}") from None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """nn.Linear (in, out) per LoRA-targetable module name in one layer."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if not self.experts:
            shapes.update(gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h))
        return shapes

    def expert_shapes(self) -> dict[str, tuple[int, int, int]]:
        """gpt-oss fused expert parameters [experts, in, out] (transformers' GptOssExperts)."""
        if self.model_type != "gpt_oss" or not self.experts:
            return {}
        e, h, i = self.experts, self.hidden, self.intermediate
        return {"gate_up_proj": (e, h, 2 * i), "down_proj": (e, i, h)}

    @property
    def attention_params(self) -> int:
        shapes = self.linear_shapes()
        params = sum(shapes[m][0] * shapes[m][1] + (shapes[m][1] if self.attention_bias else 0)
                     for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
        return params + (self.heads if self.model_type == "gpt_oss" else 0)  # one sink logit per head

    @property
    def mlp_params(self) -> int:
        h, i, e = self.hidden, self.intermediate, self.experts
        if not e:
            return 3 * h * i
        if self.model_type == "gpt_oss":  # router with bias; experts with biases (gate_up 2i, down h)
            return h * e + e + e * (h * 2 * i + 2 * i) + e * (i * h + h)
        return h * e + e * 3 * h * i  # mixtral-like: router, w1/w2/w3 without bias

    @property
    def layer_params(self) -> int:
        return self.attention_params + self.mlp_params + 2 * self.hidden  # + two RMSNorms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        heads = 1 if self.tie_embeddings else 2
        return self.layers * self.layer_params + heads * self.embedding_params + self.hidden  # + final norm

    @property
    def expert_params_per_layer(self) -> int:
        """The fused expert weights of one layer (biases not included: they stay in bf16)."""
        return sum(e * a * b for e, a, b in self.expert_shapes().values())


# GPT-OSS-FACTS.md: gpt-oss-20b (24 layers, 32 experts) and gpt-oss-120b (36 layers, 128 experts).
_GPT_OSS = dict(model_type="gpt_oss", hidden=2880, heads=64, kv_heads=8, head_dim=64, intermediate=2880,
                vocab=201_088, experts_per_token=4, attention_bias=True, tie_embeddings=False,
                mxfp4_experts=True)
BUILTIN_ARCHITECTURES: dict[str, Architecture] = {
    "openai/gpt-oss-20b": Architecture(layers=24, experts=32, **_GPT_OSS),
    "openai/gpt-oss-120b": Architecture(layers=36, experts=128, **_GPT_OSS),
}


def _demo_architecture(name: str) -> Architecture:
    from gptoss_webui.demo import DEMO_MODELS  # shapes only: nothing is built
    from gptoss_webui.tokenizer import VOCAB_SIZE

    shape = DEMO_MODELS.get(name)
    if shape is None:
        raise ArchitectureError(f"unknown demo model 'demo:{name}'; known: "
                            + ", ".join(f"demo:{n}" for n in DEMO_MODELS))
    moe = shape.architecture == "gpt_oss"
    return Architecture(
        model_type=shape.architecture, layers=shape.layers, hidden=shape.hidden_size, heads=shape.heads,
        kv_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate=shape.intermediate_size,
        vocab=VOCAB_SIZE, experts=shape.experts if moe else 0,
        experts_per_token=shape.experts_per_token if moe else 0,
        attention_bias=moe, tie_embeddings=not moe, mxfp4_experts=shape.mxfp4)  # as demo builds them


def _hub_cache_config(name: str) -> Path | None:
    """config.json of a hub model already in the local Hugging Face cache (newest snapshot)."""
    if name.count("/") != 1:
        return None
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "hub")
    snapshots = Path(hub) / f"models--{name.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_architecture(model: str) -> Architecture:
    """Architecture of train.model: a local folder, a demo name, a cached or built-in hub name."""
    if model.startswith("demo:"):
        return _demo_architecture(model.removeprefix("demo:"))
    local = Path(model).expanduser()
    config_path = local / "config.json" if local.is_dir() else _hub_cache_config(model)
    if config_path is not None and config_path.is_file():
        try:
            return Architecture.from_config_json(json.loads(config_path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArchitectureError(f"cannot read {config_path}: {exc}") from None
    if model in BUILTIN_ARCHITECTURES:
        return BUILTIN_ARCHITECTURES[model]
    if local.is_dir():
        raise ArchitectureError(f"{model} is a folder without config.json: not a model folder")
    raise ArchitectureError(
        f"cannot estimate memory for model '{model}': not a local folder with config.json, not in the "
        f"Hugging Face cache, and not a built-in architecture ({', '.join(BUILTIN_ARCHITECTURES)}, "
        "demo:tiny-gpt-oss, demo:tiny-dense). Point train.model at a downloaded model folder.")
