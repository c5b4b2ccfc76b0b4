"""Pick the attention implementation for a model on this device, and refuse the wrong ones early.

gpt-oss has one learned "sink" logit per head, which plain FlashAttention 2 does not implement
(garbage output was reported) and which transformers refuses for `sdpa`. On a GPU, flex_attention
matched eager to about 1e-6 with sinks and ran 3.8x faster at 4096 tokens (../shared/GPU-STACK.md); on
the CPU transformers refuses flex_attention with sinks, so eager is the only exact choice there
(tests/test_attention.py checks both facts on the installed versions).
"""

from __future__ import annotations

import importlib.util

from gptoss_webui.config import ConfigError


class AttentionError(ConfigError):
    pass


def choose_attention(requested: str, model_type: str, on_gpu: bool) -> str:
    is_gpt_oss = model_type == "gpt_oss"
    if requested == "auto":
        if is_gpt_oss:
            return "flex_attention" if on_gpu else "eager"
        return "sdpa"
    if is_gpt_oss and requested == "flash_attention_2":
        raise AttentionError(
            "attention=flash_attention_2 cannot run gpt-oss: FlashAttention 2 has no attention sinks, which "
            "gpt-oss uses in every layer. Use auto (flex_attention on a GPU) or eager")
    if is_gpt_oss and requested == "sdpa":
        raise AttentionError("attention=sdpa is refused by transformers for gpt-oss (attention sinks); "
                             "use auto, flex_attention (GPU) or eager")
    if is_gpt_oss and requested == "flex_attention" and not on_gpu:
        raise AttentionError("attention=flex_attention with gpt-oss's sinks runs only on a GPU in "
                             "transformers; on the CPU use eager (or auto)")
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise AttentionError("attention=flash_attention_2 needs the flash-attn package (GPU hosts: "
                             "pip install flash-attn); or use auto")
    return requested


def document_masks(config, inputs_embeds, position_ids) -> dict:
    """gpt-oss's attention masks for a batch whose position ids restart at every packed example.

    transformers turns each restart into a document boundary (masking_utils.find_packed_sequence_indices) and
    ands it with the causal mask and, for the sliding layers, the sliding window: a flex_attention block mask
    from document ids, or the same mask dense under eager. gpt-oss's forward builds its masks without the
    position ids (transformers 5.19), so it would miss the boundaries; it takes masks built here, one per layer
    type. The sinks live in the attention kernels, not in the mask, and stay as they are.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    args = {"config": config, "inputs_embeds": inputs_embeds, "attention_mask": None, "past_key_values": None,
            "position_ids": position_ids}
    return {"full_attention": create_causal_mask(**args),
            "sliding_attention": create_sliding_window_causal_mask(**args)}
