"""Acts as a smaller card: caps each training rank's CUDA allocator at GPTOSS_CAP_GIB (bench/gpu/run.sh puts this
folder on PYTHONPATH for the capped end-to-end runs). Keyed on LOCAL_RANK, so only rank processes, which the
deepspeed launcher starts with it set, are capped. Prints to stderr only: DeepSpeed parses a child Python's stdout."""

import os
import sys

if os.environ.get("GPTOSS_CAP_GIB") and os.environ.get("LOCAL_RANK") is not None:
    import torch

    rank = int(os.environ["LOCAL_RANK"])
    total = torch.cuda.get_device_properties(rank).total_memory
    fraction = float(os.environ["GPTOSS_CAP_GIB"]) * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(fraction, rank)
    print(f"[cap] rank {rank}: allocator capped at {os.environ['GPTOSS_CAP_GIB']} GiB ({fraction:.3f} of the card)",
          file=sys.stderr, flush=True)
