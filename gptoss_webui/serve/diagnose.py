"""Turn the tail of a vLLM log into one sentence a person can act on.

vLLM reports start-up failures as deep tracebacks (pydantic validation, OSError from the hub client,
a dead EngineCore). The UI shows `explain_failure(log_text)` instead of the traceback; the log file
stays available for the details.
"""

from __future__ import annotations

import re

# (pattern in the log, what to tell the user). First match wins, so specific causes come first.
_KNOWN: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"address already in use|Errno 98", re.I),
     "the port is already in use by another program: pick another port"),
    (re.compile(r"head_size not supported|Head size \d+ is not supported", re.I),
     "this model's attention head size is not supported by vLLM's attention backend on this device "
     "(the CPU build supports 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)"),
    (re.compile(r"User-specified max_model_len \((\d+)\) is greater than the derived max_model_len "
                r"\((?:max_position_embeddings=)?([\d.]+)", re.I),
     "max_model_len {0} is longer than the model's context ({1} tokens): lower serve.max_model_len"),
    (re.compile(r"triton\.language' has no attribute", re.I),
     "vLLM's CPU build cannot run LoRA on this MoE model (its fused-MoE-LoRA path needs Triton on a GPU): "
     "merge the adapter into the weights and serve the merged model"),
    (re.compile(r"OutOfMemoryError|out of memory|Cannot allocate memory|MemoryError", re.I),
     "out of memory while loading the model or allocating the KV cache: lower max_model_len, "
     "the KV cache size (CPU) or gpu_memory_utilization, or use a smaller model"),
    (re.compile(r"No available memory for the cache blocks|larger than the available KV cache memory|"
                r"KV cache is needed, which is larger than", re.I),
     "not enough memory left for the KV cache: raise gpu_memory_utilization / cpu_kv_cache_gib, or "
     "lower max_model_len"),
    (re.compile(r"Repo id must be in the form|is not a local folder and is not a valid model identifier|"
                r"does not appear to have a file named config\.json|RepositoryNotFoundError|"
                r"LocalEntryNotFoundError|We couldn't connect to", re.I),
     "model not found: the path is not a model folder and it could not be fetched from the hub"),
    (re.compile(r"VLLM_CPU_KVCACHE_SPACE", re.I),
     "the CPU KV cache setting was refused: set serve.cpu_kv_cache_gib to a whole number of GiB that fits "
     "in free memory"),
]
# Lines like `ValueError: ...` or pydantic's `  Value error, ...`: the last one is usually the cause.
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]*(?:Error|Exception)(?::| )|Value error, )\s*(.+)$")
_NOISE = re.compile(r"\bWARNING\b|ulimit|DeprecationWarning|FutureWarning|warnings\.warn")


def last_error_line(text: str) -> str | None:
    found = None
    for line in text.splitlines():
        if _NOISE.search(line):
            continue
        m = _ERROR_LINE.match(line)
        if m:
            found = m.group(1).strip()
    if found:
        found = re.sub(r"\s*\[type=\w+, input_value=.*$", "", found)  # pydantic's echo of all the args
        return found[:400]
    return None


def explain_failure(text: str) -> str:
    """One line: the known cause if one matches, else the last error line, else a generic message."""
    detail = last_error_line(text)
    for pattern, message in _KNOWN:
        m = pattern.search(text)
        if m:
            return message.format(*(re.sub(r"\.0$", "", g or "") for g in m.groups()))
    if detail:
        return detail
    return "the engine stopped without an error message"
