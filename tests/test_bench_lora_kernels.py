"""bench/lora_kernels.py's tables, read back by vLLM's own config lookup (the kernels themselves need a GPU)."""

from __future__ import annotations

import pytest

from bench import lora_kernels as lk

GPT_OSS_20B = {"hidden_size": 2880, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64}


def test_shapes_and_candidates_follow_gpt_oss_attention():
    shapes = lk.shapes_for(GPT_OSS_20B, (8,))
    qkv_expand = next(s for s in shapes if s.op == "expand" and s.module == "qkv_proj")
    assert qkv_expand.outs == (4096, 512, 512) and qkv_expand.table_k_n == (8, 4096)
    o_shrink = next(s for s in shapes if s.op == "shrink" and s.module == "o_proj")
    assert o_shrink.table_k_n == (4096, 8) and o_shrink.slices == 1
    for shape in shapes:
        small, large = lk.candidates(shape, 8), lk.candidates(shape, 64)
        assert {c["block_m"] for c in small} == {16} and {c["block_m"] for c in large} == {16, 32, 64}
        if shape.op == "shrink":  # no split beyond the K blocks there are
            assert all(c["split_k"] <= -(-shape.k_in // c["block_k"]) for c in large)
    assert [lk.token_class(m) for m in (1, 2, 8, 16, 64, 8192)] == [1, 2, 2, 16, 16, 16]


def test_tuned_tables_are_what_vllm_reads(tmp_path, monkeypatch):
    """The files are named and nested as vLLM's load_lora_op_config / get_lora_op_configs expect: its own lookup,
    pointed at them by VLLM_TUNED_CONFIG_FOLDER, returns the tuned config, also for token counts between rows."""
    import torch
    from vllm.lora.ops.triton_ops import utils

    shrink = dict(block_m=16, block_n=16, block_k=64, split_k=8, num_warps=4, num_ctas=1, num_stages=2,
                  group_size_m=8, max_nreg=None)
    expand = dict(block_m=16, block_n=128, block_k=16, num_warps=2, num_ctas=1, num_stages=2, max_nreg=None)
    rows = [{"op": "shrink", "module": "qkv_proj", "rank": 8, "slices": 3, "tokens": 16, "k": 2880, "n": 8,
             "default_us": 4.0, "best_us": 2.0, "config": shrink},
            {"op": "shrink", "module": "qkv_proj", "rank": 8, "slices": 3, "tokens": 64, "k": 2880, "n": 8,
             "default_us": 4.0, "best_us": 3.0, "config": {**shrink, "block_m": 64}},
            {"op": "expand", "module": "o_proj", "rank": 8, "slices": 1, "tokens": 16, "k": 8, "n": 2880,
             "default_us": 6.0, "best_us": 3.0, "config": expand}]
    lk.write({"gpu": "NVIDIA H200", "vllm": "0.26.0", "max_loras": 2, "rows": rows}, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("NVIDIA_H200_*.json")) == ["NVIDIA_H200_EXPAND_TRUE.json",
                                                                           "NVIDIA_H200_SHRINK.json"]
    assert "| 8 | 16 | 4.0 -> 2.0 | - | - | 6.0 -> 3.0 | - |" in (tmp_path / "lora_kernels.md").read_text()

    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    for cached in (utils.load_lora_op_config, utils.get_lora_op_configs):
        cached.cache_clear()
    try:
        lookup = utils.get_lora_op_configs
        assert lookup("shrink", max_loras=3, batch=16, hidden_size=2880, rank=8, num_slices=3) == shrink
        assert lookup("shrink", max_loras=3, batch=20, hidden_size=2880, rank=8, num_slices=3) == shrink  # nearest
        assert lookup("shrink", max_loras=5, batch=60, hidden_size=2880, rank=8, num_slices=3)["block_m"] == 64
        assert lookup("expand", max_loras=3, batch=16, hidden_size=2880, rank=8, num_slices=1,
                      add_inputs=True) == expand
        with pytest.raises(KeyError):  # a slice count that was not tuned: vLLM has no nearest for it
            lookup("shrink", max_loras=3, batch=16, hidden_size=2880, rank=8, num_slices=2)
    finally:
        for cached in (utils.load_lora_op_config, utils.get_lora_op_configs):
            cached.cache_clear()
