"""Pick the attention implementation for a model on this device, and refuse the wrong ones early.

gpt-oss has one learned "sink" logit per head, which plain FlashAttention 2 does not implement
(garbage output was reported) and which transformers refuses for `sdpa`. On a GPU, flex_attention
matched eager to about 1e-6 with sinks and ran 3.8x faster at 4096 tokens (../shared/GPU-STACK.md); on
the CPU transformers refuses flex_attention with sinks, so eager is the only exact choice there
(tests/test_attention.py checks both facts on the installed versions).
"""

from __future__ import annotations

import functools
import importlib.util

from gptoss_webui.config import ConfigError
from gptoss_webui.messages import say


class AttentionError(ConfigError):
    pass


def choose_attention(requested: str, model_type: str, on_gpu: bool) -> str:
    is_gpt_oss = model_type == "gpt_oss"
    if requested == "auto":
        if is_gpt_oss:
            return "flex_attention" if on_gpu else "eager"
        return "sdpa"
    if is_gpt_oss and requested == "flash_attention_2":
        raise AttentionError(say("attention.flash_gpt_oss"))
    if is_gpt_oss and requested == "sdpa":
        raise AttentionError(say("attention.sdpa_gpt_oss"))
    if is_gpt_oss and requested == "flex_attention" and not on_gpu:
        raise AttentionError(say("attention.flex_cpu"))
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise AttentionError(say("attention.flash_missing"))
    return requested


def document_masks(config, attention: str, position_ids, dtype) -> dict:
    """gpt-oss's attention masks for a batch whose position ids restart at 0 in every packed example (and in the
    padding): causal, inside one example only, and for the sliding layers within the window too.

    One rule (`allowed`), two renderings: a flex_attention BlockMask built from the document ids, whose blocks
    between examples are skipped, or the same pairs as eager's additive mask. The sinks live in the attention
    kernels, not in the mask, and stay as they are. gpt-oss's forward would build plain causal masks (it does
    not read the position ids in transformers 5.19), so the training forward passes these instead.
    """
    import torch
    from torch.nn.attention.flex_attention import create_mask

    docs = (position_ids == 0).cumsum(-1)  # [batch, tokens]: which example each token belongs to
    window = config.sliding_window
    batch, n = position_ids.shape

    def causal_in_document(b, h, q, kv):
        return (kv <= q) & (docs[b, q] == docs[b, kv])

    def sliding_in_document(b, h, q, kv):
        return causal_in_document(b, h, q, kv) & (q - kv < window)

    masks = {}
    for kind, allowed in (("full_attention", causal_in_document), ("sliding_attention", sliding_in_document)):
        if attention == "flex_attention":
            masks[kind] = _compiled_create_block_mask()(allowed, batch, None, n, n, device=position_ids.device)
        else:
            dense = create_mask(allowed, batch, 1, n, n, device=position_ids.device)
            masks[kind] = torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill_(
                ~dense, torch.finfo(dtype).min)
    return masks


@functools.cache
def _compiled_create_block_mask():
    """create_block_mask compiled once per process, so that no tokens x tokens tensor is materialized (4 G entries
    at 64K tokens); every step's mask then reuses the compiled function instead of wrapping it again."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)
