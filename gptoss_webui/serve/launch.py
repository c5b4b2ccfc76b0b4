"""What the vLLM server process is started with: its command line, its environment, its port.

Everything here is decided before the process exists, from an EngineInfo (model, port, LoRA) and the
ServeConfig (sizes, flags); engine.py starts the process with it.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import psutil

from gptoss_webui.config import ServeConfig, vllm_flag
from gptoss_webui.messages import say
from gptoss_webui.mxfp4 import is_mxfp4_config
from gptoss_webui.paths import cache_dir
from gptoss_webui.serve import plan, procs
from gptoss_webui.serve.state import EngineError, EngineInfo

MXFP4_MOE_BACKEND = "marlin"  # vLLM's MoE kernel for MXFP4 experts; serve.extra_args may name another
# The gpt-oss modules an adapter can adapt, in vLLM's names: attention (peft's q/k/v_proj are vLLM's fused qkv_proj)
# and the fused experts. Unrestricted, vLLM also wraps the MoE router (HF's router is no nn.Linear, so no peft adapter
# adapts it) and runs its LoRA kernels on every token of every layer: 48 of a step's 144 LoRA linear kernels. Without
# them expert LoRA decoded 16 streams at 0.856-0.857x the base instead of 0.832 (H200, bench/README.md, tenth session).
GPT_OSS_LORA_MODULES = ("qkv_proj", "o_proj", "experts")


def build_command(info: EngineInfo, config: ServeConfig) -> list[str]:
    """The vLLM server command for `info` (model, port, LoRA) and `config` (sizes, flags)."""
    cpu = plan.engine_is_cpu()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", info.model, "--served-model-name", info.served_name,
           "--host", info.host, "--port", str(info.port),
           "--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
           "--tensor-parallel-size", str(config.tensor_parallel_size),
           "--max-num-seqs", str(config.max_concurrency)]
    if not cpu:
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.block_size:
        cmd += ["--block-size", str(config.block_size)]
    if config.enforce_eager:
        cmd.append("--enforce-eager")
    elif not cpu:  # the CPU build captures no graphs (it empties the list whatever it is given)
        cmd += ["--cudagraph-capture-sizes", *map(str, graph_sizes(config.max_concurrency))]
    if info.model_type == "gpt_oss":
        cmd += ["--reasoning-parser", "openai_gptoss"]
    user_flags = {vllm_flag(arg) for arg in config.extra_args if arg.startswith("--")}
    if not cpu and is_mxfp4_config(plan.model_config(info.model)) and "--moe-backend" not in user_flags:
        # vLLM 0.26 picks MARLIN for MXFP4 experts with LoRA on and TRITON with it off; on an H200, TRITON decoded the
        # 20b at 0.38-0.41x MARLIN's speed at 32 and 64 requests (bench/README.md, 2026-12-01, sixth session).
        cmd += ["--moe-backend", MXFP4_MOE_BACKEND]
    if info.lora_enabled:
        wanted = max([config.max_lora_rank, *(plan.adapter_rank(p) for p in info.pending_adapters.values())])
        rank = info.max_lora_rank = plan.vllm_lora_rank(wanted)
        if rank != config.max_lora_rank:
            accepted = ", ".join(map(str, plan.VLLM_LORA_RANKS))
            info.notes.append(f"max LoRA rank {rank} (vLLM accepts {accepted}; configured "
                              f"{config.max_lora_rank}, adapters need {wanted})")
        cmd += ["--enable-lora", "--max-loras", str(max(config.max_loras, len(info.pending_adapters))),
                "--max-lora-rank", str(rank)]
        if info.model_type == "gpt_oss":
            cmd += ["--lora-target-modules", *GPT_OSS_LORA_MODULES]
        if not (cpu or config.enforce_eager or config.base_graphs):
            # vLLM captures every graph size twice with LoRA on, with and without adapters; this keeps the adapter
            # ones. Dotted: vLLM merges it with extra_args' --compilation-config.KEY VALUE (a JSON one is refused).
            cmd += ["--compilation-config.cudagraph_specialize_lora", "false"]
            info.notes.append(str(say("serving.launch.base_graphs_off")))
    return cmd + config.extra_args


def graph_sizes(concurrency: int) -> list[int]:
    """The batch sizes to capture CUDA graphs for: powers of two below `concurrency`, then itself. vLLM's
    default captures about 50 sizes up to 512; the start pays for each (79 s of 243 s on an H100)."""
    sizes = [1 << i for i in range(concurrency.bit_length()) if 1 << i < concurrency]
    return [*sizes, concurrency]


def engine_caches(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Where the engine keeps what it compiles, unless `environ` names other folders: in the workspace (the /data
    volume in Docker), so that the next start of the same engine skips the work.
    - VLLM_CACHE_ROOT: torch.compile's artefacts and the start-up plan;
    - TRITON_CACHE_DIR: Triton's kernels (vLLM's LoRA and MoE kernels, Inductor's), compiled on first use of each
      shape. Triton's default is the home folder, which a new container does not keep; on an H200 a warm start that
      found them took 53.1 s, one that compiled them again 75.1 s (bench/README.md, ninth session)."""
    return {key: environ.get(key, str(cache_dir() / folder))
            for key, folder in (("VLLM_CACHE_ROOT", "vllm"), ("TRITON_CACHE_DIR", "triton"))}


def build_env(info: EngineInfo, config: ServeConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(engine_caches(env))
    # The start-up plan: the KV cache size the first start profiled, kept under VLLM_CACHE_ROOT and reused by later
    # starts of the same config on the same card (vLLM re-profiles when anything differs, or when less memory is
    # free). Off in vLLM by default; a warm start then skips the memory profiling and its CUDA graph memory estimate.
    env.setdefault("VLLM_ENABLE_STARTUP_PLAN", "1")
    # The API server forks its EngineCore (vLLM's library default) instead of spawning it (what `vllm serve` picks when
    # this is unset): a spawned EngineCore imports vLLM again, 16 s of a warm start's 82 s on an H200 (2026-12-01,
    # bench/README.md). vLLM switches to spawn itself where fork is unsafe (CUDA initialized in the server) and on
    # its CPU platform.
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    if info.lora_enabled:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if plan.engine_is_cpu():
        # Required on the CPU (else vLLM sizes the cache from memory other programs are using); whole GiB.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(config.cpu_kv_cache_gib)))
    if info.api_key_env:
        # Through the environment rather than --api-key: a command line is visible to every user in `ps`.
        env["VLLM_API_KEY"] = os.environ[info.api_key_env]
    if info.model_type == "gpt_oss":
        # openai_harmony (the chat path of gpt-oss) loads o200k ranks from here instead of the internet.
        from gptoss_webui.tokenizer import o200k_ranks_file

        try:
            env["TIKTOKEN_ENCODINGS_BASE"] = str(o200k_ranks_file().parent)
        except RuntimeError as exc:
            raise EngineError(say("serving.launch.o200k", error=str(exc))) from None
    return env


def served_name(spec: str, model: str) -> str:
    """demo:tiny-gpt-oss -> tiny-gpt-oss; runs/x/merged -> x-merged; a folder -> its name; a hub id as is."""
    if spec.startswith("demo:"):
        return spec.removeprefix("demo:")
    path = Path(model)
    if not path.exists():
        return spec
    path = path.resolve()
    return f"{path.parent.name}-merged" if path.name == "merged" else path.name


def pick_port(host: str, port: int, strict: bool, notes: list[str]) -> int:
    """`port` when free; else the next free one (noted), or an error when `strict`."""
    if procs.port_free(host, port):
        return port
    if strict:
        raise EngineError(say("serving.launch.port_busy", port=port, host=host))
    for candidate in range(port + 1, min(port + 200, 65536)):
        if procs.port_free(host, candidate):
            notes.append(str(say("serving.launch.port_moved", port=port, candidate=candidate)))
            return candidate
    raise EngineError(say("serving.launch.ports_busy", first=port, last=port + 199, host=host))


def check_cpu_memory(model: str, kv_gib: float) -> None:
    """On the CPU the weights and the KV cache share RAM with everything else: refuse what cannot fit."""
    weights = sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) / 2**30
    free = psutil.virtual_memory().available / 2**30
    need = weights + max(1, math.ceil(kv_gib))
    if need > free:
        raise EngineError(say("serving.launch.cpu_memory", weights=weights, kv=max(1, math.ceil(kv_gib)), need=need,
                              free=free))
