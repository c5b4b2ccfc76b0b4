"""Attention for gpt-oss: what `auto` picks must be exact against eager, with sinks that matter.

On the CPU, transformers refuses flex_attention with sinks (so auto picks eager there); on a GPU the
flex-vs-eager equivalence runs (bench/gpu runs this file on the lent H100/H200).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptoss_webui.train.attention import choose_attention


def _model(path, impl: str, device: str):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.linspace(-4, 4, p.numel()).view_as(p))  # large enough to matter
    return model.to(device).train()


def _logits_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    attn = model.model.layers[0].self_attn
    return out.logits.detach(), attn.sinks.grad.detach().clone(), attn.q_proj.weight.grad.detach().clone()


def test_sinks_matter_in_the_tiny_model(tiny_gpt_oss):
    model = _model(tiny_gpt_oss, "eager", "cpu")
    ids = torch.randint(0, 199_000, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_sinks = model(ids).logits
        for layer in model.model.layers:
            layer.self_attn.sinks.zero_()
        without = model(ids).logits
    assert ((with_sinks - without).abs().max() / with_sinks.abs().max()) > 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_cpu_refuses_flex_with_sinks_so_auto_picks_eager(tiny_gpt_oss):
    assert choose_attention("auto", "gpt_oss", on_gpu=False) == "eager"
    model = _model(tiny_gpt_oss, "flex_attention", "cpu")
    with pytest.raises(ValueError, match="Attention sinks cannot be run on CPU with flex attention"):
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: flex_attention with sinks is GPU-only")
def test_auto_on_gpu_matches_eager_in_logits_and_gradients(tiny_gpt_oss):
    chosen = choose_attention("auto", "gpt_oss", on_gpu=True)
    ids = torch.randint(0, 199_000, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    ref = _logits_and_grads(_model(tiny_gpt_oss, "eager", "cuda"), ids)
    got = _logits_and_grads(_model(tiny_gpt_oss, chosen, "cuda"), ids)
    for r, g in zip(ref, got, strict=True):
        assert ((g - r).abs().max() / r.abs().max()).item() < 1e-4
