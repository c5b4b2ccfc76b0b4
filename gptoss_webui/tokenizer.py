"""gpt-oss's tokenizer, o200k_harmony, built offline: the o200k_base ranks and the harmony special tokens.

The o200k_base ranks come from a pinned npm registry package (js-tiktoken), checked against the sha256 of OpenAI's
o200k_base.tiktoken and cached in the workspace; the harmony special tokens come from the oss-harmony package.
The demo models carry the tokenizer built here; serving points vLLM's harmony parser at the same ranks.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import urllib.request
from pathlib import Path

from gptoss_webui.paths import cache_dir, package_data
from gptoss_webui.runs import atomic_write_text

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

def o200k_ranks_file() -> Path:
    """The o200k_base.tiktoken file, rebuilt from the pinned npm package when missing or wrong."""
    target = cache_dir() / "tiktoken" / "o200k_base.tiktoken"
    if target.is_file() and sha256(target.read_bytes()) == O200K_SHA256:
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
    if sha256(text.encode()) != O200K_SHA256:
        raise RuntimeError("rebuilt o200k_base ranks do not match OpenAI's published checksum")
    atomic_write_text(target, text)
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
