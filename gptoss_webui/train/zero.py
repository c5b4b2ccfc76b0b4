"""The DeepSpeed JSON config, generated from TrainConfig (never written by hand).

"auto" values are filled in by transformers' Trainer from its TrainingArguments, so batch sizes,
learning rate and clipping have one source: the TrainConfig.
"""

from __future__ import annotations

from typing import Any

from gptoss_webui.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.bucket_size,
    }
    if ds.stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=ds.bucket_size, reduce_scatter=True)
    else:
        # ZeRO-3: gather each layer's weights just in time; keep whole-model gathers out of the save path.
        zero.update(stage3_prefetch_bucket_size=ds.bucket_size, stage3_param_persistence_threshold=100_000,
                    stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "steps_per_print": 10**9,  # progress goes to events.jsonl, not DeepSpeed's own prints
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        # With the optimizer on the CPU, DeepSpeed's own CPU Adam is the fast path (not torch's AdamW).
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                            "weight_decay": "auto"}}
    return config
