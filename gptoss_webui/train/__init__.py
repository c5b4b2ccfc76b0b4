"""Training: launcher (parent side), worker (the deepspeed subprocess), data, LoRA, ZeRO, memory."""
