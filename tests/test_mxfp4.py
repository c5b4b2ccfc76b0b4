"""MXFP4-resident experts and expert LoRA as low-rank products (train/experts.py, train/weights.py, mxfp4.py).

On the tiny gpt-oss in its MXFP4 layout (demo:tiny-gpt-oss-mxfp4), in fp32 on the CPU:
- the decode equals transformers' reference decode, bit for bit;
- the MXFP4 path equals the bf16 path (every expert decoded once at load, by the same decode, which equals
  transformers' bit for bit): logits, every LoRA gradient and 20 steps of AdamW losses, to 1e-6 relative (both
  run the same grouped code on the same decoded values);
- the adapter it saves is peft's: peft loads it onto transformers' model (peft's own ParamWrapper), gives the
  same logits, and merge_and_unload gives them too;
- bad checkpoints are refused or fall back with one line.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from gptoss_webui.config import ConfigError, TrainConfig
from gptoss_webui.mxfp4 import _decode, choose_base_weights, decode, random_experts
from gptoss_webui.train.weights import load_base_model
from gptoss_webui.train.worker import load_model

EXPERT_LORA = {"expert_layers": "all"}


def _model(path, base_weights: str, seed: int = 0, **train):
    cfg = TrainConfig.model_validate({"precision": "fp32", "base_weights": base_weights, "lora": EXPERT_LORA,
                                      **train})
    torch.manual_seed(seed)  # the same LoRA init in every model built with the same seed
    model, used, note = load_model(str(path), None, cfg, "eager")
    with torch.no_grad():  # lora_B starts at zero: give it values, so the LoRA terms count
        gen = torch.Generator().manual_seed(seed + 1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model, used, note


def _batch(seed: int = 1):
    return torch.randint(0, 5000, (2, 48), generator=torch.Generator().manual_seed(seed))


def test_decode_equals_transformers_reference():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_experts(3, 64, 96, generator=torch.Generator().manual_seed(0))
    scales = scales + torch.randint(-20, 20, scales.shape, generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        ours = decode(blocks, scales, dtype)
        ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, cols, rows]
        assert ours.shape == (3, 64, 96)
        assert torch.equal(ours.transpose(1, 2), ref)


def test_mxfp4_path_equals_bf16_path(tiny_gpt_oss_mxfp4):
    ids = _batch()
    runs = {}
    for base in ("mxfp4", "bf16"):
        model, used, note = _model(tiny_gpt_oss_mxfp4, base)
        assert (used, note) == (base, "")
        experts = model.get_base_model().model.layers[0].mlp.experts.base_layer.base_layer
        assert experts.mxfp4 == (base == "mxfp4")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert any(".mlp.experts.base_layer.lora_A" in n for n in grads)  # expert LoRA is trained
        with torch.no_grad():
            runs[base] = model(input_ids=ids).logits, grads, loss.detach()
    (logits_m, grads_m, loss_m), (logits_b, grads_b, loss_b) = runs["mxfp4"], runs["bf16"]
    assert torch.allclose(logits_m, logits_b, rtol=1e-6, atol=1e-6)
    assert torch.allclose(loss_m, loss_b, rtol=1e-6)
    assert grads_m.keys() == grads_b.keys()
    for name in grads_m:
        assert torch.allclose(grads_m[name], grads_b[name], rtol=1e-6, atol=1e-7), name


def test_twenty_steps_of_losses_agree(tiny_gpt_oss_mxfp4):
    losses = {}
    for base in ("mxfp4", "bf16"):
        model, _, _ = _model(tiny_gpt_oss_mxfp4, base, gradient_checkpointing=True)
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[base] = []
        for step in range(20):
            ids = _batch(100 + step % 2)  # two batches, seen ten times each: the loss must fall
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[base].append(loss.item())
    assert losses["mxfp4"][-1] < losses["mxfp4"][0] - 0.1  # it learns
    assert losses["mxfp4"] == pytest.approx(losses["bf16"], rel=1e-5)


def test_saved_adapter_is_peft_layout_loads_and_merges(tiny_gpt_oss_mxfp4, tmp_path):
    """Save from the MXFP4 path; peft loads it on transformers' model (its own ParamWrapper) and merges it."""
    from peft import PeftModel

    ids = _batch()
    model, _, _ = _model(tiny_gpt_oss_mxfp4, "mxfp4")
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == sorted(
        f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("gate_up_proj", "down_proj"))
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in saved  # gate_up (inner)
    assert "base_model.model.model.layers.1.mlp.experts.lora_B.weight" in saved  # down_proj (outer)

    from transformers import Mxfp4Config

    base = AutoModelForCausalLM.from_pretrained(tiny_gpt_oss_mxfp4, quantization_config=Mxfp4Config(dequantize=True))
    peft_model = PeftModel.from_pretrained(base.float(), tmp_path / "adapter")
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the output...
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)  # ...as peft computes it
    assert torch.allclose(ours, merged, rtol=1e-5, atol=1e-5)


def _corrupt_copy(src, dst, edit):
    shutil.copytree(src, dst)
    for path in dst.glob("model-*.safetensors"):
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    return dst


def test_nan_scales_are_refused_before_training(tiny_gpt_oss_mxfp4, tmp_path):
    def nan_scale(tensors):
        tensors["model.layers.1.mlp.experts.down_proj_scales"][0, 3, 1] = 255

    bad = _corrupt_copy(tiny_gpt_oss_mxfp4, tmp_path / "bad", nan_scale)
    cfg = TrainConfig.model_validate({"precision": "fp32", "model": str(bad)})
    with pytest.raises(ConfigError, match=r"corrupt MXFP4 checkpoint: model.layers.1.mlp.experts.down_proj_scales "
                                          r"holds 1 NaN scales"):
        load_base_model(str(bad), None, cfg, "eager")


def test_wrong_block_shape_is_refused(tiny_gpt_oss_mxfp4, tmp_path):
    def truncate(tensors):
        key = "model.layers.0.mlp.experts.gate_up_proj_blocks"
        tensors[key] = tensors[key][:, :, :1].contiguous()

    bad = _corrupt_copy(tiny_gpt_oss_mxfp4, tmp_path / "bad", truncate)
    for base_weights in ("mxfp4", "bf16"):  # checked before loading, whichever form the experts then take
        cfg = TrainConfig.model_validate({"precision": "fp32", "base_weights": base_weights})
        with pytest.raises(ConfigError, match=r"model.layers.0.mlp.experts.gate_up_proj_blocks is \[4, 128, 1, 16\]; "
                                              r"MXFP4 for this config is \[4, 128, 2, 16\]"):
            load_base_model(str(bad), None, cfg, "eager")


def test_fallbacks_say_why(tiny_gpt_oss, tiny_gpt_oss_mxfp4):
    cfg = TrainConfig(model=str(tiny_gpt_oss), base_weights="mxfp4")
    mode, note = choose_base_weights(cfg, checkpoint_mxfp4=False)
    assert (mode, str(note)) == ("bf16", f"base_weights=mxfp4, but {tiny_gpt_oss} does not store its experts in "
                                         "MXFP4: they load as stored, in bf16")
    assert choose_base_weights(TrainConfig(), checkpoint_mxfp4=False) == ("bf16", None)  # auto: nothing to say
    zero3 = TrainConfig.model_validate({"base_weights": "mxfp4", "deepspeed": {"stage": 3}})
    mode, note = choose_base_weights(zero3, checkpoint_mxfp4=True)
    assert mode == "bf16" and "ZeRO-3" in str(note)
    assert choose_base_weights(TrainConfig(base_weights="mxfp4"), checkpoint_mxfp4=True) == ("mxfp4", None)
    assert AutoConfig.from_pretrained(tiny_gpt_oss_mxfp4).quantization_config["quant_method"] == "mxfp4"


def test_auto_takes_bf16_where_it_fits_else_mxfp4():
    from gptoss_webui.architecture import BUILTIN_ARCHITECTURES
    from gptoss_webui.train.memory import estimate

    arch = BUILTIN_ARCHITECTURES["openai/gpt-oss-20b"]
    cfg = TrainConfig.model_validate({"model": "openai/gpt-oss-20b", "data": {"max_length": 4096}})
    roomy, small = estimate(cfg, arch, 79.1, 1), estimate(cfg, arch, 23.5, 1)
    assert roomy.base_weights == "bf16" and "auto -> bf16" in str(roomy.notes[-1])
    assert small.base_weights == "mxfp4" and small.fits
    assert "auto -> mxfp4: bf16 experts would need" in str(small.notes[-1])


@pytest.mark.parametrize(("expert_layers", "experts", "quantized"), [
    ("all", "float32 (the adapter changes the experts, so they are stored merged)", False),
    ([], "MXFP4, the base's own codes (the adapter leaves the experts untouched)", True),
])
def test_merge_writes_what_vllm_loads(tiny_gpt_oss_mxfp4, tmp_path, expert_layers, experts, quantized):
    """An adapter trained on the MXFP4 path merges into a folder whose logits equal HF+peft's (merge_adapter
    checks that, to 1e-4 in fp32); its experts are merged in the model's dtype when the adapter changes them,
    else kept as the base's own MXFP4 codes with quantization_config, as vLLM loads them."""
    from gptoss_webui.checkpoint import read_safetensors
    from gptoss_webui.serve.merge import merge_adapter

    model, _, _ = _model(tiny_gpt_oss_mxfp4, "mxfp4", lora={"expert_layers": expert_layers})
    assert model.config.use_cache is False  # training's loader turns the KV cache off; the merge below keeps the base's
    model.save_pretrained(tmp_path / "adapter")
    result = merge_adapter(str(tiny_gpt_oss_mxfp4), tmp_path / "adapter", tmp_path / "merged")
    assert result.ok and result.adapter_effect > 1e-2 and result.experts == experts
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert ("quantization_config" in config) is quantized
    assert config["architectures"] == ["GptOssForCausalLM"]  # else vLLM serves embeddings
    assert config["use_cache"] is True  # the base's: without it, HF generate() recomputes every token's prefix
    merged, base = read_safetensors(tmp_path / "merged"), read_safetensors(tiny_gpt_oss_mxfp4)
    key = "model.layers.1.mlp.experts.down_proj"
    if quantized:
        assert torch.equal(merged[f"{key}_blocks"], base[f"{key}_blocks"]) and key not in merged
    else:
        assert merged[key].shape == (4, 64, 64) and f"{key}_blocks" not in merged


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_check_refuses_a_merge_that_drops_the_expert_lora(tiny_gpt_oss_mxfp4, tmp_path, monkeypatch, dtype):
    """The merge's check passes a bf16 merge, whose rounding moves the logits, and refuses the same merge with
    peft's expert merge (ParamWrapper) turned into a no-op, in either dtype: the folder is not kept."""
    from peft.tuners.lora.layer import ParamWrapper

    from gptoss_webui.serve.merge import MergeError, merge_adapter

    model, _, _ = _model(tiny_gpt_oss_mxfp4, "mxfp4", lora={"expert_layers": "all"})
    model.save_pretrained(tmp_path / "adapter")
    result = merge_adapter(str(tiny_gpt_oss_mxfp4), tmp_path / "adapter", tmp_path / "merged", dtype=dtype)
    assert result.ok and result.reload_diff <= 1e-5 * max(1.0, result.max_abs_logit)
    monkeypatch.setattr(ParamWrapper, "merge", lambda self, *args, **kwargs: None)
    with pytest.raises(MergeError, match="does NOT reproduce"):
        merge_adapter(str(tiny_gpt_oss_mxfp4), tmp_path / "adapter", tmp_path / "dropped", dtype=dtype)
    assert not (tmp_path / "dropped").exists()


def test_a_merge_is_reused_only_in_the_dtype_asked_for(tiny_gpt_oss_mxfp4, tmp_path):
    """bench/serve.py --dtype float32 needs the merge in fp32 (random weights' greedy tokens part at once in bf16): a
    bf16 merge in the folder is made again in fp32, not reused; asked for again in bf16 after that, the same."""
    from gptoss_webui.serve.merge import merge_in_subprocess

    model, _, _ = _model(tiny_gpt_oss_mxfp4, "mxfp4", lora={"expert_layers": "all"})
    model.save_pretrained(tmp_path / "adapter")
    base, adapter, merged = str(tiny_gpt_oss_mxfp4), tmp_path / "adapter", tmp_path / "merged"
    first = merge_in_subprocess(base, adapter, merged, dtype="bfloat16")
    assert (first.ok, first.dtype, first.reused) == (True, "bfloat16", False)
    assert merge_in_subprocess(base, adapter, merged, dtype="bfloat16").reused
    fp32 = merge_in_subprocess(base, adapter, merged)  # the base's own dtype: the tiny model is fp32
    assert (fp32.ok, fp32.dtype, fp32.reused) == (True, "float32", False)


def test_a_merge_cut_short_leaves_no_partial_copy(tiny_gpt_oss_mxfp4, tmp_path):
    """A merge killed on the way (here: by its timeout) leaves no staging folder behind, nor one an earlier killed
    merge left: on gpt-oss-20b that is up to 39 GiB of disk (16 GiB were found on the GPU host, 2026-12-01)."""
    from gptoss_webui.serve.merge import MergeError, merge_in_subprocess, staging_dir

    model, _, _ = _model(tiny_gpt_oss_mxfp4, "mxfp4", lora={"expert_layers": "all"})
    model.save_pretrained(tmp_path / "adapter")
    leftover = staging_dir(tmp_path / "merged")
    leftover.mkdir()
    (leftover / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    with pytest.raises(MergeError, match="merge did not finish"):
        merge_in_subprocess(str(tiny_gpt_oss_mxfp4), tmp_path / "adapter", tmp_path / "merged", timeout_s=0.5)
    assert not leftover.exists() and not (tmp_path / "merged").exists()


def test_disk_check_counts_what_the_merge_will_write(tmp_path, monkeypatch):
    """gpt-oss-20b in MXFP4: an attention-only merge keeps the codes (the base's size on disk), an expert merge
    writes every weight in bf16 (38.96 GiB)."""
    import shutil

    from gptoss_webui.serve import merge

    base = tmp_path / "gpt-oss-20b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "model_type": "gpt_oss", "num_hidden_layers": 24, "hidden_size": 2880, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880, "vocab_size": 201088,
        "num_local_experts": 32, "num_experts_per_tok": 4, "tie_word_embeddings": False, "dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4"}}))
    save_file({"x": torch.zeros(2**18, dtype=torch.uint8)}, base / "model-00001.safetensors")  # 256 KiB
    for name, targets in (("attention", None), ("experts", ["model.layers.7.mlp.experts.gate_up_proj"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"target_parameters": targets}))
    monkeypatch.setattr(merge.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 10**12, 2**20))
    merge.check_disk_space(str(base), tmp_path / "attention", tmp_path)  # 256 KiB fits in 1 MiB
    with pytest.raises(merge.MergeError, match="the merged model needs about 39.0 GiB"):
        merge.check_disk_space(str(base), tmp_path / "experts", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernel needs a GPU (or TRITON_INTERPRET=1 with Triton installed)")
def test_gpu_decode_kernel_is_bit_exact_for_every_code_and_scale():
    """Every byte (two codes) under every valid scale (0..254; 255 is refused as NaN), bit for bit against the
    torch decode and transformers' reference: signed zeros, subnormals and infinities included. The kernel's
    programs cover 128 scale blocks each, so some see only scales in 2..252 (the table path) and the first and
    last see the others (the exact integer path): both paths are checked."""
    pytest.importorskip("triton")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from gptoss_webui.mxfp4_triton import decode_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    exponents = torch.arange(255, dtype=torch.uint8)
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(255, 16, 16).reshape(255, 1, 16, 16)
    scales = exponents.view(255, 1, 1).expand(255, 1, 16).contiguous()
    ours = decode_bf16(blocks.to(device), scales.to(device)).cpu()
    torch_ops = _decode(blocks, scales, torch.bfloat16)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).transpose(1, 2)
    assert torch.equal(ours.view(torch.int16), torch_ops.view(torch.int16))
    assert torch.equal(ours.view(torch.int16), reference.contiguous().view(torch.int16))


def test_keeping_the_decoded_experts_changes_no_gradient(tiny_gpt_oss_mxfp4):
    """Kept for the backward or decoded again there (train/experts.py): the same loss and LoRA gradients."""
    from gptoss_webui.train.experts import GroupedExperts

    ids, grads = _batch(), {}
    for keep in (True, False):
        model, _, _ = _model(tiny_gpt_oss_mxfp4, "mxfp4", gradient_checkpointing=True, model=str(tiny_gpt_oss_mxfp4))
        experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
        assert experts and all(m.keep_decoded for m in experts)  # the worker's pick: no GPU here, nothing to judge
        for m in experts:
            m.keep_decoded = keep
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[keep] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[True])


def test_the_estimate_keeps_the_decoded_experts_where_they_fit():
    """A 24 GB card has room for a layer's decoded experts in its backward; the 16 GB preset decodes again."""
    from gptoss_webui.presets import load_preset
    from gptoss_webui.train.memory import estimate_for_recipe

    roomy = estimate_for_recipe(load_preset("gpt-oss-20b-1x24gb").train, search_fix=False)
    assert roomy.fits and roomy.keep_decoded
    tight = estimate_for_recipe(load_preset("gpt-oss-20b-1x16gb").train, search_fix=False)
    assert tight.fits and not tight.keep_decoded
    assert "decoded again in the backward (keeping them would need 0.49 GiB more)" in " ".join(map(str, tight.notes))
    eager = load_preset("gpt-oss-20b-1x24gb", ["train.gradient_checkpointing=false"]).train
    assert not estimate_for_recipe(eager, search_fix=False).keep_decoded  # every layer's would be kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU decode (a Triton custom op), torch's grouped GEMM")
@pytest.mark.parametrize("keep", [True, False])
def test_gpu_mxfp4_experts_compile_as_one_graph(keep):
    """A compiled layer traces its MXFP4 experts whole, forward and backward, both ways of holding the decoded weight.
    torch 2.11 could not trace `_gpu_kernels[again]` (a tuple indexed by a bool) and ran every layer's experts eagerly:
    12,103 against 13,333 tokens/s on the H200 (bench/README.md, 2026-12-01). fullgraph=True turns such a fallback
    into an error."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from gptoss_webui.train.experts import GroupedExperts

    torch._dynamo.reset()
    config = GptOssConfig(num_local_experts=4, hidden_size=64, intermediate_size=64, num_experts_per_tok=2)
    tensors = {}
    for name, rows in (("gate_up_proj", 128), ("down_proj", 64)):  # [out, in] as the checkpoint stores them
        blocks, scales = random_experts(4, rows, 64, device="cuda")
        tensors |= {f"{name}_blocks": blocks, f"{name}_scales": scales,
                    f"{name}_bias": torch.zeros(4, rows, device="cuda")}
    experts = GroupedExperts.from_mxfp4(GptOssExperts(config), tensors)
    experts.keep_decoded = keep
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    indices, weights = torch.randint(0, 4, (32, 2), device="cuda"), torch.rand(32, 2, device="cuda")
    grads = []
    for run in (torch.compile(experts, fullgraph=True), experts):
        run(x, indices, weights).float().square().sum().backward()
        grads.append(x.grad)
        x.grad = None
    assert torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-2)
