"""MXFP4-resident experts against bf16 experts decoded from the same codes, on gpt-oss-20b's shape (GPU).

    python -m bench.mxfp4_check --out DIR [--layers 24] [--seq 2048] [--steps 20]

One set of random MXFP4 tensors in the released layout; model A keeps the experts as codes (train.base_weights:
mxfp4), model B holds them decoded to bf16 (what Mxfp4Config(dequantize=True) gives). Both get the preset's LoRA
(attention + experts of layers 7/15/23) with the same seed and the same nonzero lora_B. Reported: relative error
of the logits and of every LoRA gradient, and 20 steps of AdamW losses side by side. Both paths run the same
grouped GEMMs on identical bf16 weights, so any difference is run-to-run nondeterminism of bf16 kernels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.model import gpt_oss_20b_config
from gptoss_webui.checkpoint import decode_expert_tensors
from gptoss_webui.mxfp4 import random_checkpoint_tensors
from gptoss_webui.presets import load_recipe
from gptoss_webui.train.weights import assemble_for_training
from gptoss_webui.train.worker import prepare_model


def build(tensors: dict, config, base: str, cfg):
    if base == "bf16":  # decode every expert weight up front, into transformers' [E, in, out] layout
        decode_expert_tensors(tensors, torch.bfloat16)
    model = assemble_for_training(config, tensors, torch.bfloat16, "flex_attention", source="random weights")
    torch.manual_seed(0)
    model = prepare_model(model, cfg)
    with torch.no_grad():
        gen = torch.Generator(device="cuda").manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device="cuda") * 0.01)
    return model.cuda().train()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    config = gpt_oss_20b_config(layers=args.layers)
    cfg = load_recipe("gpt-oss-20b-1xh100", ["train.deepspeed.enabled=false", "train.compile=false",
                                               f"train.data.max_length={args.seq}"]).train
    gen = torch.Generator(device="cuda").manual_seed(2)
    batches = [torch.randint(0, 199_998, (1, args.seq), device="cuda", generator=gen) for _ in range(2)]
    results = {}
    for base in ("mxfp4", "bf16"):
        model = build(dict(random_checkpoint_tensors(config, torch.bfloat16, "cuda")), config, base, cfg)
        ids = batches[0]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            logits = model(input_ids=ids[:, :512]).logits
        model.zero_grad(set_to_none=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        losses = []
        for step in range(args.steps):
            ids = batches[step % 2]
            step_loss = model(input_ids=ids, labels=ids).loss
            step_loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(step_loss.item(), 5))
        results[base] = {"loss": loss.item(), "logits": logits, "grads": grads, "losses": losses,
                         "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    m, b = results["mxfp4"], results["bf16"]
    grad_err = {n: rel(m["grads"][n], b["grads"][n]) for n in b["grads"]}
    report = {
        "card": torch.cuda.get_device_name(0), "layers": args.layers, "seq": args.seq,
        "logits_rel_err": rel(m["logits"], b["logits"]), "loss": [m["loss"], b["loss"]],
        "max_grad_rel_err": max(grad_err.values()), "worst_grad": max(grad_err, key=grad_err.get),
        "expert_grads": sum(".mlp.experts." in n for n in grad_err), "grads": len(grad_err),
        "losses_mxfp4": m["losses"], "losses_bf16": b["losses"],
        "max_loss_diff": max(abs(x - y) for x, y in zip(m["losses"], b["losses"], strict=True)),
        "peak_gib": {"mxfp4": m["peak_gib"], "bf16": b["peak_gib"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mxfp4_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if not k.startswith("losses_")}, indent=1))
    print("losses mxfp4", m["losses"])
    print("losses bf16 ", b["losses"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
