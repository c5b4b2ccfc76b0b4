"""The per-GPU memory estimate: exact parameter counts, hand-computed terms, the calibration against
../shared/GPU-STACK.md's measured peaks, the shipped presets' verdicts, and the cheapest-fix search."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from gptoss_webui import hardware
from gptoss_webui.architecture import BUILTIN_ARCHITECTURES, Architecture, ArchitectureError, resolve_architecture
from gptoss_webui.cli import main
from gptoss_webui.config import LoraConfig, TrainConfig
from gptoss_webui.presets import load_preset, load_recipe
from gptoss_webui.train.memory import GIB, count_lora, estimate, estimate_for_recipe

GPT_OSS_20B = BUILTIN_ARCHITECTURES["openai/gpt-oss-20b"]
GPT_OSS_120B = BUILTIN_ARCHITECTURES["openai/gpt-oss-120b"]
P20B = 20_914_757_184  # GPT-OSS-FACTS.md


@pytest.fixture(autouse=True)
def _no_gpus(monkeypatch):
    """Judge only what the test says: this host's GPUs (or lack of them) never leak in."""
    monkeypatch.setattr(hardware, "gpus", lambda: [])


# --- architecture and LoRA counts ----------------------------------------------------------------

def test_gpt_oss_parameter_counts_match_the_facts():
    per_layer = (
        (2880 * 4096 + 4096) + 2 * (2880 * 512 + 512) + (4096 * 2880 + 2880) + 64  # q, k, v, o (+bias), sinks
        + (2880 * 32 + 32)  # router
        + 32 * (2880 * 5760 + 5760) + 32 * (2880 * 2880 + 2880)  # experts gate_up, down (+bias)
        + 2 * 2880  # two RMSNorms
    )
    assert GPT_OSS_20B.total_params == 24 * per_layer + 2 * 201_088 * 2880 + 2880 == P20B
    assert round(GPT_OSS_120B.total_params / 1e9, 1) == 116.8
    assert GPT_OSS_20B.expert_params_per_layer / GPT_OSS_20B.layer_params > 0.96


def test_lora_counts_are_exact():
    # GPT-OSS-FACTS.md: q_proj + v_proj on all 24 layers at r=8.
    qv = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], expert_parameters=[])
    assert count_lora(qv, GPT_OSS_20B).total == 24 * 8 * ((2880 + 4096) + (2880 + 512)) == 1_990_656
    # GPU-STACK.md: r=16 on q, k, v, o.
    qkvo = LoraConfig(r=16, expert_parameters=[])
    assert count_lora(qkvo, GPT_OSS_20B).total == 7_962_624
    # peft ParamWrapper on [E, in, out]: lora_A Linear(in, r*E), lora_B Linear(r*E, out).
    experts = LoraConfig(r=8, target_modules=[], expert_layers=[7, 15, 23])
    assert count_lora(experts, GPT_OSS_20B).experts == 3 * 8 * 32 * ((2880 + 5760) + (2880 + 2880))
    everything = LoraConfig(r=8, expert_layers="all")
    assert count_lora(everything, GPT_OSS_20B).experts == 24 * 8 * 32 * ((2880 + 5760) + (2880 + 2880))
    outside = count_lora(LoraConfig(r=8, expert_layers=[1, 30]), GPT_OSS_20B)
    assert outside.expert_layers == (1,) and "[30]" in str(outside.notes[0])


def test_counts_match_transformers_and_peft():
    """The same numbers from a real (tiny) GptOss model and peft's own trainable count."""
    pytest.importorskip("peft")
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, GptOssConfig

    shape = dict(vocab_size=96, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=40, num_local_experts=4,
                 num_experts_per_tok=2, tie_word_embeddings=False)
    config = GptOssConfig(**shape, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = AutoModelForCausalLM.from_config(config)
    arch = Architecture.from_config_json(json.loads(config.to_json_string()))
    assert arch.total_params == sum(p.numel() for p in model.parameters())
    ours = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], expert_layers=[1])
    peft_model = get_peft_model(model, PeftLoraConfig(
        r=4, target_modules=ours.target_modules,
        target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"]))
    assert count_lora(ours, arch).total == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_architecture_sources(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt_oss", "num_hidden_layers": 24, "hidden_size": 2880, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880, "vocab_size": 201088,
        "num_local_experts": 32, "num_experts_per_tok": 4, "attention_bias": True,
        "tie_word_embeddings": False, "quantization_config": {"quant_method": "mxfp4"}}))
    assert resolve_architecture(str(tmp_path)) == GPT_OSS_20B
    tiny = resolve_architecture("demo:tiny-gpt-oss")
    assert (tiny.layers, tiny.hidden, tiny.experts, tiny.head_dim) == (2, 64, 4, 32)
    dense = resolve_architecture("demo:tiny-dense")
    assert dense.experts == 0 and dense.tie_embeddings
    with pytest.raises(ArchitectureError, match="not a local folder"):
        resolve_architecture("someone/unknown-model")
    with pytest.raises(ArchitectureError, match="demo:tiny-gpt-oss"):
        resolve_architecture("demo:nope")


# --- terms computed by hand ------------------------------------------------------------------------

def _cfg(**kw) -> TrainConfig:
    """bf16 base weights unless a test asks for MXFP4: most terms are easiest to check on the plain layout."""
    base = dict(model="openai/gpt-oss-20b", gpu_memory_gib=80.0, num_gpus=1, base_weights="bf16")
    return TrainConfig.model_validate({**base, **kw})


EMBEDDINGS = 201_088 * 2880  # the input embeddings stay in CPU memory (train/weights.py CpuEmbedding)


def _terms(est) -> dict[str, float]:
    return {str(t.name): t.gib for t in est.terms}


def test_hand_computed_terms_zero2():
    cfg = _cfg(data={"max_length": 4096}, lora={"r": 8, "expert_parameters": []}, num_gpus=2)
    est = estimate(cfg, GPT_OSS_20B, 80.0, 2)
    terms = _terms(est)
    P = 24 * 8 * (2 * (2880 + 4096) + 2 * (2880 + 512))
    assert est.trainable_params == P
    assert terms["base weights"] == pytest.approx((P20B - EMBEDDINGS) * 2 / 2**30)  # ZeRO-2: a copy per GPU
    assert terms["LoRA weights + grads + Adam"] == pytest.approx(P * (4 + (4 + 8) / 2) / 2**30)
    assert terms["saved activations"] == pytest.approx(
        (24 * 1 * 4096 * 2880 * 2 + 4096 * 2880 * (4 + 2)) / 2**30)  # layer inputs + final norm/lm_head input
    # train/loss.py: a slice of 333 rows (bf16 logits, their fp32 copy, the bf16 gradient) + d(hidden) in bf16
    assert terms["logits + loss"] == pytest.approx((333 * 201_088 * (4 + 2 * 2) + 4096 * 2880 * 2) / 2**30)
    assert terms["DeepSpeed buckets"] == pytest.approx(4.5 * 200_000_000 * 2 / 2**30)
    assert terms["CUDA context"] == 0.75
    assert str(est.peak_at) == "recomputed layer"  # the logits are never whole: one layer's backward is the peak
    counted = [t.gib for t in est.terms if t.counted]
    assert est.total_gib == pytest.approx(sum(counted))
    assert terms["fragmentation (5%)"] == pytest.approx(0.05 * est.peak_allocated_gib)
    assert est.margin_gib == pytest.approx(80.0 - est.total_gib)


def test_hand_computed_terms_zero3_and_offload():
    z3 = _cfg(deepspeed={"stage": 3}, num_gpus=4)
    terms = _terms(estimate(z3, GPT_OSS_20B, 80.0, 4))
    assert terms["base weights"] == pytest.approx(P20B * 2 / 4 / 2**30)
    assert terms["ZeRO-3 gathered layers"] == pytest.approx(2.5 * GPT_OSS_20B.layer_params * 2 / 2**30)
    off = _cfg(deepspeed={"stage": 3, "offload_params": True, "offload_optimizer": True}, num_gpus=2)
    est = estimate(off, GPT_OSS_20B, 80.0, 2)
    terms = _terms(est)
    assert terms["base weights"] == 0.0
    P = est.trainable_params
    assert terms["LoRA weights + grads + Adam"] == pytest.approx(P * (4 / 2 + 4 / 2) / 2**30)  # Adam on CPU


def test_hand_computed_terms_mxfp4():
    """MXFP4-resident experts: 4.25 bits a weight, the rest bf16 (input embeddings on the CPU), and the recomputed
    layer's two decoded expert weights (gate_up_proj 32 x 2880 x 5760, down_proj 32 x 2880 x 2880 in bf16) kept
    for its backward; or, where those do not fit, one at a time (the largest, gate_up_proj)."""
    est = estimate(_cfg(base_weights="mxfp4", data={"max_length": 4096}), GPT_OSS_20B, 80.0, 1)
    terms = _terms(est)
    experts = 24 * 32 * (2880 * 5760 + 2880 * 2880)
    assert terms["base weights"] == pytest.approx((experts * 0.53125 + (P20B - experts - EMBEDDINGS) * 2) / 2**30)
    assert experts * 0.53125 / 2**30 == pytest.approx(9.46, abs=0.01)  # GPT-OSS-FACTS.md
    bf16 = _terms(estimate(_cfg(data={"max_length": 4096}), GPT_OSS_20B, 80.0, 1))
    assert est.keep_decoded
    assert terms["recomputed layer"] - bf16["recomputed layer"] == pytest.approx(32 * 2880 * 8640 * 2 / 2**30)
    again = _terms(estimate(_cfg(base_weights="mxfp4", data={"max_length": 4096}), GPT_OSS_20B, 80.0, 1,
                            keep_decoded=False))
    assert again["recomputed layer"] - bf16["recomputed layer"] == pytest.approx(32 * 2880 * 5760 * 2 / 2**30)
    fallback = estimate(_cfg(base_weights="mxfp4", deepspeed={"stage": 3}), GPT_OSS_20B, 80.0, 1)
    assert any("falls back to bf16 under ZeRO-3" in str(n) for n in fallback.notes)


def test_eager_recompute_is_quadratic_and_flex_linear():
    eager = estimate(_cfg(data={"max_length": 8192}, attention="eager"), GPT_OSS_20B, 80.0, 1)
    flex = estimate(_cfg(data={"max_length": 8192}, attention="auto"), GPT_OSS_20B, 80.0, 1)
    assert flex.attention == "flex_attention"  # auto on a GPU, for gpt-oss
    layer = _terms(eager)["recomputed layer"]
    assert layer > 4 * 64 * 8192 * 8192 * 2 / 2**30  # 4.25 score tensors of b x heads x s x s x 2 B
    assert str(eager.peak_at) == str(flex.peak_at) == "recomputed layer"
    assert eager.total_gib > flex.total_gib + 10


# --- calibration against GPU-STACK.md --------------------------------------------------------------

# gpt-oss-20b architecture, LoRA r=16 on q,k,v,o, AdamW, micro batch 1, no DeepSpeed, one GPU.
# (seq, gradient checkpointing, attention, measured peak GiB or None for OOM). Same numbers on H100/H200.
MEASURED_WEIGHTS_GIB = 38.99
MEASURED = [
    (1024, False, "eager", 50.77),
    (1024, True, "eager", 41.95),
    (4096, True, "eager", 50.49),  # also 50.49 with the per-expert loop: the experts kernel does not matter
    (4096, False, "eager", 121.81),
    (8192, True, "eager", 76.08),
    (4096, True, "flex_attention", 50.43),
    (8192, True, "flex_attention", 61.73),
    (4096, False, "flex_attention", 73.29),
]
# Which ran and which ran out of memory, per card.
VERDICTS = {
    139.8: [(8192, False, "eager", False)] + [(s, c, a, True) for s, c, a, _ in MEASURED],
    79.18: [(1024, False, "eager", True), (1024, True, "eager", True), (4096, True, "eager", True),
            (4096, False, "eager", False), (8192, True, "eager", False), (4096, True, "flex_attention", True),
            (8192, True, "flex_attention", True), (4096, False, "flex_attention", True)],
}


def _measured_cfg(seq: int, ckpt: bool, attention: str) -> TrainConfig:
    return _cfg(data={"max_length": seq}, gradient_checkpointing=ckpt, attention=attention,
                lora={"r": 16, "alpha": 32, "expert_parameters": []}, deepspeed={"enabled": False})


def calibration_table() -> list[tuple[int, bool, str, float, float, float, float]]:
    rows = []
    for seq, ckpt, attention, measured in MEASURED:
        est = estimate(_measured_cfg(seq, ckpt, attention), GPT_OSS_20B, 139.8, 1, plain_hf=True)
        peak = est.peak_allocated_gib  # torch's allocated peak: no context, no fragmentation
        excess_err = (peak - MEASURED_WEIGHTS_GIB) / (measured - MEASURED_WEIGHTS_GIB)
        err = 100 * (peak / measured - 1)
        rows.append((seq, ckpt, attention, measured, peak, err, 100 * (excess_err - 1)))
    return rows


def test_calibration_against_measured_peaks():
    # The four activation/logits constants were fitted on six of these rows (1024/4096 eager without
    # checkpointing, 4096 flex without, 8192 eager with, 4096/8192 flex with); the 1024 and 4096 eager
    # checkpointed rows were not used. All eight land within 0.5 % of the measured peak (1.5 % of the part
    # above the weights), so the bound asserted is 1 % and 2 %.
    for seq, ckpt, attention, measured, peak, err, excess_err in calibration_table():
        print(f"seq {seq:5d} ckpt {ckpt!s:5} {attention:14s} measured {measured:7.2f} estimated {peak:7.2f} "
              f"error {err:+5.2f} % (above weights {excess_err:+5.2f} %)")
        assert abs(err) <= 1.0, (seq, ckpt, attention)
        assert abs(excess_err) <= 2.0, (seq, ckpt, attention)


# Our pipeline (train/loss.py, train/experts.py, worker.prepare_model) on gpt-oss-20b, no DeepSpeed, flex_attention,
# checkpointing, measured by bench/train.py --grid small (MEASURED_OURS_SOURCE; -1.7 % to +0.6 %):
# (seq, LoRA, compiled layers, base weights, measured allocated peak GiB).
PRESET_LORA = {"r": 8, "alpha": 16}  # attention + experts of layers 7/15/23, as the gpt-oss-20b presets
MEASURED_OURS_SOURCE = "H200, 2026-11-30, bench/results/2026-11-30-h200-small.json"
MEASURED_OURS = [
    (4096, PRESET_LORA, True, "bf16", 39.76),
    (4096, PRESET_LORA, True, "mxfp4", 14.53),
    (2048, PRESET_LORA, True, "mxfp4", 14.01),
    (4096, PRESET_LORA, False, "mxfp4", 14.51),
    (2048, PRESET_LORA, True, "bf16", 39.05),  # H200, 2026-12-01, bench/results/2026-12-01-h200-bench-2048.json
    (65536, PRESET_LORA, True, "bf16", 64.35),  # the same day, under a 79 GiB cap: 2026-12-01-h200-long.json
]


def test_estimate_of_our_pipeline_within_10_percent():
    # The loss and decode terms were derived from train/loss.py's and train/experts.py's buffers, not fitted.
    assert MEASURED_OURS
    for seq, lora, compiled, base, measured in MEASURED_OURS:
        cfg = _cfg(data={"max_length": seq}, attention="flex_attention", lora=lora, compile=compiled,
                   base_weights=base, deepspeed={"enabled": False})
        peak = estimate(cfg, GPT_OSS_20B, 79.18, 1).peak_allocated_gib
        err = 100 * (peak / measured - 1)
        print(f"seq {seq:5d} {base} compile {compiled!s:5} measured {measured:6.2f} estimated {peak:6.2f} "
              f"error {err:+5.2f} %")
        assert abs(err) <= 10.0, (seq, lora, compiled, base)


# ZeRO-3 through the real pipeline (CLI -> deepspeed -> worker) on two H200s, gpt-oss-20b in the released layout
# (bf16 under ZeRO-3), the 2x24gb preset at seq 2048 without compile, 2026-11-30
# (bench/results/2026-11-30-h200-e2e-zero3*-events.jsonl): (offload params + optimizer, measured peak GiB).
MEASURED_ZERO3 = [(False, 24.33), (True, 4.78)]


def test_zero3_estimate_within_10_percent():
    for offload, measured in MEASURED_ZERO3:
        cfg = load_preset("gpt-oss-20b-2x24gb", [
            "train.deepspeed.stage=3", "train.compile=false", "train.data.max_length=2048",
            f"train.deepspeed.offload_params={str(offload).lower()}",
            f"train.deepspeed.offload_optimizer={str(offload).lower()}"]).train
        peak = estimate(cfg, GPT_OSS_20B, 139.8, 2, search_fix=False).peak_allocated_gib
        assert abs(100 * (peak / measured - 1)) <= 10.0, (offload, measured, peak)


# The small-card presets as shipped, through the real pipeline under allocator caps on H200s, 2026-11-30
# (bench/results/2026-11-30-h200-e2e-*-events.jsonl): (preset, architecture, GPUs, measured peak GiB).
MEASURED_PRESETS = [
    ("gpt-oss-20b-1x16gb", "openai/gpt-oss-20b", 1, 14.10),
    ("gpt-oss-20b-1x24gb", "openai/gpt-oss-20b", 1, 14.57),
    ("gpt-oss-20b-2x24gb", "openai/gpt-oss-20b", 2, 14.47),
    ("gpt-oss-120b-1xh100", "openai/gpt-oss-120b", 1, 67.80),
]


def test_the_cookbook_run_estimate_within_10_percent():
    """bench/cookbook.py's run (the 1xh100 preset, 4 packed blocks of 2048 a step, ZeRO-2 on one H200): 41.74 GiB
    (bench/results/2026-12-01-h200-cookbook-cold.json)."""
    cfg = load_recipe("gpt-oss-20b-1xh100", ["train.data.max_length=2048", "train.optim.micro_batch_size=4"]).train
    est = estimate(cfg, GPT_OSS_20B, cfg.gpu_memory_gib, 1, search_fix=False)
    assert abs(100 * (est.peak_allocated_gib / 41.74 - 1)) <= 10.0, est.peak_allocated_gib


def test_the_longest_max_length_is_within_10_percent_of_the_measured_limit():
    """H200 capped at 79 GiB, bf16 experts, DeepSpeed off, compiled (bench.train --grid long, bench/README.md,
    2026-12-01): 76,800 tokens trained and 86,016 ran out of memory, so the limit lies in [76,800, 86,016). The
    promised length is within 10 % of any limit there, and short of the length that failed."""
    from gptoss_webui.train.memory import LONGEST_LENGTH_MARGIN

    cfg = load_recipe("gpt-oss-20b-1xh100", ["train.deepspeed.enabled=false", "train.compile=true"]).train
    est = estimate(cfg, GPT_OSS_20B, 79.0, 1)
    longest = est.longest_max_length
    assert longest and longest % 1024 == 0 and longest < 86016, longest
    assert all(abs(longest / limit - 1) <= 0.10 for limit in (76800, 86015)), longest
    assert "longest max_length that fits" in est.report()

    def total(n: int) -> float:
        data = cfg.data.model_copy(update={"max_length": n})
        return estimate(cfg.model_copy(update={"data": data}), GPT_OSS_20B, 79.0, 1).total_gib

    margin = 1 + LONGEST_LENGTH_MARGIN
    assert total(longest) * margin <= 79.0 < total(longest + 1024) * margin


@pytest.mark.parametrize(("preset", "model", "gpus", "measured"), MEASURED_PRESETS)
def test_preset_estimates_within_10_percent(preset, model, gpus, measured):
    cfg = load_preset(preset).train
    est = estimate(cfg, BUILTIN_ARCHITECTURES[model], cfg.gpu_memory_gib, gpus, search_fix=False)
    assert est.base_weights == "mxfp4"
    assert abs(100 * (est.peak_allocated_gib / measured - 1)) <= 10.0, est.peak_allocated_gib


@pytest.mark.parametrize("gpu_gib", sorted(VERDICTS))
def test_verdicts_match_what_ran_and_what_ran_out_of_memory(gpu_gib):
    for seq, ckpt, attention, ran in VERDICTS[gpu_gib]:
        est = estimate(_measured_cfg(seq, ckpt, attention), GPT_OSS_20B, gpu_gib, 1, plain_hf=True)
        assert est.fits is ran, (gpu_gib, seq, ckpt, attention, est.total_gib)


# --- the shipped presets ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt-oss-20b-1xh100", "gpt-oss-20b-1x24gb", "gpt-oss-20b-1x16gb",
                                  "gpt-oss-20b-2x24gb", "gpt-oss-120b-1xh200", "gpt-oss-120b-1xh100",
                                  "gpt-oss-120b-8xh100", "tiny-cpu-demo"])
def test_shipped_presets_fit(name):
    est = estimate_for_recipe(load_preset(name).train)
    assert est.fits, est.report()
    assert est.margin_gib >= 0


def test_2x24gb_in_bf16_does_not_fit_and_mxfp4_is_the_fix():
    train = load_preset("gpt-oss-20b-2x24gb", ["train.base_weights=bf16"]).train
    est = estimate_for_recipe(train)
    assert not est.fits
    assert est.margin_gib < -((P20B - EMBEDDINGS) * 2 / 2**30 - 23.5)  # the bf16 weights alone are over the card
    assert f"{-est.margin_gib:.1f} GiB over a 23.5 GiB card" in str(est.verdict)
    assert est.fix is not None and str(est.fix.change) == "keep the experts in MXFP4 (base_weights bf16 -> mxfp4)"
    assert est.fix.overrides == ["train.base_weights=mxfp4"] and est.fix.margin_gib > 0
    assert "cheapest fix" in est.report()


def test_cli_exit_codes(capsys):
    assert main(["estimate", "--config", "gpt-oss-20b-1xh100"]) == 0
    assert "fits with" in capsys.readouterr().out
    assert main(["estimate", "--config", "gpt-oss-20b-1x24gb", "--set", "train.base_weights=bf16"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "--set train.base_weights=mxfp4" in out


# --- judging target, fixes, UI contract -------------------------------------------------------------

def test_cpu_host_without_gpu_memory_still_computes():
    est = estimate_for_recipe(load_preset("tiny-cpu-demo").train)
    assert est.gpu_gib is None and est.fits and est.total_gib > 0
    assert est.attention == "eager"  # what the CPU demo runs
    assert "no GPU" in est.report()


def test_gpus_present_set_card_size_and_world(monkeypatch):
    cards = [hardware.Gpu(0, "A", 24.0, 0.1), hardware.Gpu(1, "B", 22.0, 0.1)]
    monkeypatch.setattr(hardware, "gpus", lambda: cards)
    est = estimate_for_recipe(TrainConfig(model="demo:tiny-gpt-oss"))
    assert est.gpu_gib == 22.0 and est.world_size == 2


@pytest.mark.parametrize("changes, words", [
    (dict(gradient_checkpointing=False, attention="eager"), "gradient checkpointing"),
    (dict(data={"max_length": 8192}, attention="eager"), "flex_attention"),
    (dict(optim={"micro_batch_size": 24, "gradient_accumulation_steps": 2}), "micro batch 24 -> 12"),
])
def test_cheapest_fix_order(changes, words):
    # A checkpoint without MXFP4 experts, so that MXFP4 (always the cheapest fix where it exists) is no option.
    bf16_checkpoint = dataclasses.replace(GPT_OSS_20B, mxfp4_experts=False)
    est = estimate(_cfg(**{"lora": {"expert_parameters": []}, "data": {"max_length": 4096}, **changes}),
                   bf16_checkpoint, 79.18, 1)
    assert not est.fits and est.fix is not None
    assert words in str(est.fix.change) and "+" not in str(est.fix.change)


def test_combined_fix_when_no_single_change_fits():
    cfg = _cfg(gradient_checkpointing=False, attention="eager", data={"max_length": 8192})
    est = estimate(cfg, dataclasses.replace(GPT_OSS_20B, mxfp4_experts=False), 79.18, 1)
    assert not est.fits and est.fix is not None and "+" in str(est.fix.change)
    assert str(est.fix.change) == "turn on gradient checkpointing + attention eager -> flex_attention"
    assert est.fix.overrides == ["train.gradient_checkpointing=true", "train.attention=flex_attention"]
    assert est.fix.margin_gib >= 0


def test_to_dict_is_json_and_import_is_light():
    est = estimate_for_recipe(load_preset("gpt-oss-20b-1xh100").train)
    data = json.loads(json.dumps(est.to_dict()))
    assert data["fits"] and data["verdict"].startswith("fits") and data["terms"][0]["name"] == "base weights"
    code = ("import sys; from gptoss_webui.presets import load_preset; from gptoss_webui.train.memory import "
            "estimate_for_recipe; estimate_for_recipe(load_preset('gpt-oss-120b-8xh100').train); "
            "assert 'torch' not in sys.modules, 'estimate imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fits_is_total_against_gpu_memory():
    est = estimate(_cfg(), GPT_OSS_20B, 1000.0, 1)
    tight = estimate(_cfg(), GPT_OSS_20B, est.total_gib - 0.01, 1)
    assert est.fits and not tight.fits and tight.margin_gib == pytest.approx(-0.01)
    assert GIB == 2**30


def test_offloaded_activations_leave_one_layer_input_on_the_gpu():
    """offload_activations: what the forward saves waits in CPU memory (not counted on the GPU); the backward holds
    one layer's input at a time, and the final norm's input, again."""
    on, off = (load_recipe("gpt-oss-20b-1xh100", ["train.data.max_length=65536", "train.base_weights=bf16",
                                                  f"train.offload_activations={flag}"]).train
               for flag in ("true", "false"))
    est_on, est_off = (estimate(cfg, GPT_OSS_20B, 79.0, 1) for cfg in (on, off))
    final = 65536 * 2880 * (4 + 2)
    cpu = next(t for t in est_on.terms if str(t.name) == "saved activations, in CPU memory")
    assert not cpu.counted and cpu.gib == pytest.approx(_terms(est_off)["saved activations"])
    assert _terms(est_on)["saved activations"] == pytest.approx((65536 * 2880 * 2 + final) / 2**30)
    assert est_off.total_gib - est_on.total_gib == pytest.approx(1.05 * 23 * 65536 * 2880 * 2 / 2**30)
    assert est_on.longest_max_length > est_off.longest_max_length


def test_a_length_that_only_offload_fits_is_offered_offload_not_a_shorter_length():
    cfg = load_recipe("gpt-oss-20b-1xh100", ["train.data.max_length=98304", "train.base_weights=bf16"]).train
    est = estimate(cfg, dataclasses.replace(GPT_OSS_20B, mxfp4_experts=False), 79.0, 1)
    assert not est.fits and est.fix is not None
    assert est.fix.overrides == ["train.offload_activations=true"]
