"""The embedded default: a tiny gpt-oss with random weights, the real o200k_harmony tokenizer, demo data.

Everything is built offline and deterministically (seeded). The o200k_base ranks come from a pinned
npm registry package (js-tiktoken), checked against the sha256 of OpenAI's o200k_base.tiktoken; the
harmony special tokens come from the oss-harmony package. Builds are cached under the workspace and
rebuilt when a file is missing or its checksum does not match.

Names usable wherever a model or dataset path is expected:
  demo:tiny-gpt-oss   GptOssForCausalLM, 2 layers (sliding + full), 4 experts, head_dim 32
  demo:tiny-gpt-oss-mxfp4  the same shape in the released checkpoints' layout: MXFP4 experts (random codes)
  demo:tiny-dense     LlamaForCausalLM of the same width and tokenizer (vLLM's CPU build runs LoRA on it)
  demo:harmony        the shipped demo dataset (harmony `messages`, some rows with `thinking`)
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gptoss_webui.paths import cache_dir, package_data, workspace_dir

DEMO_PREFIX = "demo:"
VOCAB_SIZE = 201_088  # gpt-oss: o200k_base (199,998 ranks) + harmony specials, ids < 201,088

# js-tiktoken ships o200k_base's ranks; the tarball's integrity is the registry's sha512.
JS_TIKTOKEN_URL = "https://registry.npmjs.org/js-tiktoken/-/js-tiktoken-1.0.21.tgz"
JS_TIKTOKEN_SHA512_B64 = "biOj/6M5qdgx5TKjDnFT1ymSpM5tbd3ylwDtrQvFQSu0Z7bBYko2dF+W/aUkXUPuk6IVpRxk/3Q2sHOzGlS36g=="
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
BUILD_VERSION = 1  # bump when the recipe below changes: cached builds are then rebuilt


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


# --- o200k ranks and the tokenizer -------------------------------------------------------------

def o200k_ranks_file() -> Path:
    """The o200k_base.tiktoken file, rebuilt from the pinned npm package when missing or wrong."""
    target = cache_dir() / "tiktoken" / "o200k_base.tiktoken"
    if target.is_file() and _sha256(target.read_bytes()) == O200K_SHA256:
        return target
    try:
        with urllib.request.urlopen(JS_TIKTOKEN_URL, timeout=120) as resp:
            tgz = resp.read()
    except OSError as exc:
        raise RuntimeError(
            f"could not fetch the o200k ranks from the npm registry ({JS_TIKTOKEN_URL}): {exc}. "
            f"Copy an o200k_base.tiktoken file (sha256 {O200K_SHA256}) to {target} to build offline."
        ) from None
    digest = base64.b64encode(hashlib.sha512(tgz).digest()).decode()
    if digest != JS_TIKTOKEN_SHA512_B64:
        raise RuntimeError(f"{JS_TIKTOKEN_URL} does not match its pinned sha512; refusing to use it")
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        member = tar.extractfile("package/dist/ranks/o200k_base.js")
        source = member.read().decode("utf-8") if member else ""
    text = _tiktoken_text_from_js_ranks(source)
    if _sha256(text.encode()) != O200K_SHA256:
        raise RuntimeError("rebuilt o200k_base ranks do not match OpenAI's published checksum")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def _tiktoken_text_from_js_ranks(source: str) -> str:
    """js-tiktoken stores ranks as lines of `<key> <first rank> <base64 token> <base64 token> ...`."""
    payload = json.loads(source[source.index("{"):source.rindex("}") + 1])
    lines = []
    for row in payload["bpe_ranks"].split("\n"):
        if not row:
            continue
        _key, first, *tokens = row.split(" ")
        lines.extend(f"{tok} {int(first) + i}\n" for i, tok in enumerate(tokens))
    return "".join(lines)


def harmony_special_tokens() -> dict[str, int]:
    """The o200k_harmony special tokens (name -> id) as the oss-harmony encoder defines them."""
    enc = load_harmony_encoding()
    specials = {tok: enc.encode(tok, allowed_special="all")[0] for tok in enc.special_tokens_set}
    return {tok: i for tok, i in sorted(specials.items(), key=lambda kv: kv[1]) if i < VOCAB_SIZE}


def load_harmony_encoding():
    """oss-harmony's gpt-oss encoding, reading the ranks from our cache instead of the internet."""
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(o200k_ranks_file().parent)
    from openai_harmony import HarmonyEncodingName
    from openai_harmony import load_harmony_encoding as _load

    return _load(HarmonyEncodingName.HARMONY_GPT_OSS)


def build_tokenizer(out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = harmony_special_tokens()
    converter = TikTokenConverter(vocab_file=str(o200k_ranks_file()), pattern=O200K_PATTERN)
    backend = converter.converted()
    # Specials must land on their harmony ids: every id between the ranks and them is a special.
    assert backend.get_vocab_size() == min(specials.values()), "ranks and specials must be contiguous"
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    tok.chat_template = (package_data() / "harmony_chat_template.jinja").read_text(encoding="utf-8")
    tok.save_pretrained(out_dir)


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

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p.read_bytes()) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "BUILD.json"}


def _is_intact(folder: Path) -> bool:
    try:
        info = json.loads((folder / "BUILD.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("version") == BUILD_VERSION and info.get("files") == _manifest(folder)


def ensure_demo_model(name: str) -> Path:
    """The folder of a demo model, built on first use and rebuilt if missing or corrupt."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model '{name}'; known: {', '.join(DEMO_MODELS)}")
    folder = workspace_dir() / "models" / name
    if _is_intact(folder):
        return folder
    tmp = folder.with_name(f".{name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_model(name, tmp)
    (tmp / "BUILD.json").write_text(json.dumps({"version": BUILD_VERSION, "files": _manifest(tmp)}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def resolve_model(spec: str) -> str:
    """Turn `demo:<name>` into the built folder; any other spec is returned unchanged."""
    if spec.startswith(DEMO_PREFIX):
        return str(ensure_demo_model(spec[len(DEMO_PREFIX):]))
    return spec


def resolve_dataset(spec: str) -> str:
    if spec.startswith(DEMO_PREFIX):
        name = spec[len(DEMO_PREFIX):]
        if name not in DEMO_DATASETS:
            raise ValueError(f"unknown demo dataset '{name}'; known: {', '.join(DEMO_DATASETS)}")
        return str(package_data() / DEMO_DATASETS[name])
    return spec


def build_all() -> dict[str, str]:
    """What `python -m gptoss_webui demo` builds and prints."""
    out = {name: str(ensure_demo_model(name)) for name in DEMO_MODELS}
    out["tokenizer"] = out["tiny-gpt-oss"]
    out["dataset"] = resolve_dataset("demo:harmony")
    return out
