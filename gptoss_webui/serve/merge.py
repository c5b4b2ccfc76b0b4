"""Merge a LoRA adapter into its base model (peft merge_and_unload) and prove the result is the same model.

The merge runs in its own process (`python -m gptoss_webui.serve.merge`): it holds a full copy of the
weights, and the UI process must not grow by that much nor die with it. Two checks on a fixed probe, before
vLLM serves the folder: the merged model's logits against HF+peft's (base + adapter, unmerged), so a merge that
silently drops expert LoRA tensors (peft `target_parameters`) is caught; and the folder reloaded from disk against
the merged model it was saved from, so wrong keys or a lossy save are caught.

    python -m gptoss_webui.serve.merge --base BASE --adapter ADAPTER --out OUT [--report FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gptoss_webui.messages import Message, say
from gptoss_webui.runs import atomic_write_text

PROVENANCE_FILE = "merged_from.json"
# A fixed probe sequence (plain o200k ids, far below the specials) so the check needs no tokenizer.
PROBE_IDS = [13225, 2375, 11, 495, 382, 261, 1746, 328, 290, 3490, 13, 2632]
# The merged model against HF+peft, max |logit difference|. fp32: the same up to rounding order, relative to
# max(1, max |logit|). 16-bit: the merge rounds W + BA to the dtype once more; on gpt-oss-20b's 24 layers that moved
# bf16 logits by 12 % of a random r=8 adapter's own effect (CPU, 2026-12-01), so the merged model must carry at
# least half of the adapter's effect: a merge that dropped it would be as far away as the base.
TOLERANCE = {"float32": 1e-4}
DTYPES = ("float32", "bfloat16", "float16")  # what a merge computes and stores in
HALF_PRECISION_SHARE = 0.5
# The folder reloaded against the model it was saved from, same device and dtype: the same numbers.
RELOAD_TOLERANCE = 1e-5


class MergeError(Exception):
    """A merge that could not be done or did not reproduce the adapter; the message says why."""


@dataclass
class MergeResult:
    out_dir: str
    base: str
    adapter: str
    dtype: str
    max_abs_diff: float
    max_abs_logit: float
    adapter_effect: float  # max |logit change| the adapter makes on the probe: 0 means it does nothing
    tolerance: float  # the bound max_abs_diff is held to, in logits
    reload_diff: float  # the saved folder reloaded against the merged model in memory
    ok: bool
    seconds: float
    reused: bool = False
    experts: str = ""  # how the merged folder stores the experts, and why (see merge_adapter)

    def summary(self) -> Message:
        """One line on the merge (str() is English)."""
        if self.reused:
            return say("serving.merge.reused", out_dir=self.out_dir)
        verdict = say("serving.merge.reproduces") if self.ok else say("serving.merge.not_reproduced")
        text = say("serving.merge.summary", verdict=verdict, diff=self.max_abs_diff,
                   logit=self.max_abs_logit, tolerance=self.tolerance, dtype=self.dtype,
                   effect=self.adapter_effect, reload=self.reload_diff, seconds=self.seconds)
        if self.experts:
            text = say("serving.merge.experts", text=text, experts=self.experts)
        if self.adapter_effect == 0.0:
            text = say("serving.merge.no_effect", text=text)
        return text


# --- in the merge process -----------------------------------------------------------------------

def _load_base(base: str, dtype_name: str, device: str | None = None):
    """The base in plain transformers modules, on `device` (else where _merge_device puts it). MXFP4 experts are
    decoded by our loader: transformers 5.19 saves a model it dequantized itself under broken expert names
    (`gate_up_proj$`), which nothing loads back."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptoss_webui.checkpoint import assemble_model, decode_expert_tensors, read_safetensors
    from gptoss_webui.mxfp4 import is_mxfp4_config

    dtype = getattr(torch, dtype_name)
    config = AutoConfig.from_pretrained(base)
    if is_mxfp4_config(config):
        tensors = read_safetensors(Path(base))
        device = device or _merge_device(tensors, dtype)
        tensors = decode_expert_tensors(tensors, dtype, keep_on=device)
        return assemble_model(config, tensors, dtype, "eager", source=base).to(device)
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device or "cpu")


def _merge_device(tensors: dict, dtype) -> str:
    """Where the whole model goes for the merge, all on one device: the GPU when the model, experts decoded, fits
    in its free memory with a quarter to spare (fast), else the CPU (a 16 or 24 GB card)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    values = sum(t.numel() * (2 if k.endswith("_blocks") else 1) for k, t in tensors.items()
                 if not k.endswith("_scales"))  # a code byte holds two values
    return "cuda" if values * dtype.itemsize * 1.25 < torch.cuda.mem_get_info()[0] else "cpu"


def _save_keeping_mxfp4_experts(merged, base: str, out_dir: Path) -> None:
    """The merged model with the base's own MXFP4 expert codes: the adapter left the experts untouched, so
    they stay 4-bit on disk (12.8 GiB for gpt-oss-20b instead of 39) and vLLM serves them with its MXFP4 kernels."""
    from gptoss_webui.checkpoint import read_safetensors
    from gptoss_webui.mxfp4 import EXPERT_WEIGHTS, save_checkpoint

    codes = {k: v for k, v in read_safetensors(Path(base)).items() if k.endswith(("_blocks", "_scales"))}
    plain = ((k, v) for k, v in merged.state_dict().items()
             if not k.endswith(tuple(f".experts.{w}" for w in EXPERT_WEIGHTS)))
    config = merged.config.to_dict()
    config["quantization_config"] = json.loads((Path(base) / "config.json").read_text())["quantization_config"]
    save_checkpoint(itertools.chain(plain, codes.items()), config, out_dir)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(out_dir)


def _probe_logits(model, routing: list | None = None) -> tuple:
    """The probe's logits, and what each MoE router chose. Given `routing` (an earlier call's), every router
    replays that choice instead: the merge rounds W + BA to the dtype once more, which in bf16 flips near-tied
    expert choices (then a token's logits move by far more than the rounding), and that says nothing about
    whether the merge is right."""
    import torch

    routers = [m for name, m in model.named_modules() if name.endswith("mlp.router")]
    chosen: list = []

    def record(module, args, output):
        chosen.append(output)

    def replay(index):
        return lambda module, args, output: tuple(t.to(output[0].device) for t in routing[index])

    hooks = [r.register_forward_hook(record if routing is None else replay(i)) for i, r in enumerate(routers)]
    try:
        with torch.no_grad():
            ids = torch.tensor([PROBE_IDS], device=model.device)
            return model(input_ids=ids).logits.float().cpu(), chosen
    finally:
        for hook in hooks:
            hook.remove()


def _free_device_cache() -> None:
    """Give the merged copy's GPU memory back before the reload takes as much again."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pick_dtype(base: str) -> str:
    """Merge in the base's own dtype (bf16 for real checkpoints), fp32 for fp32 checkpoints."""
    try:
        cfg = json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return "bfloat16"
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return name if name in DTYPES else "bfloat16"


def merge_adapter(base: str, adapter: str | Path, out_dir: str | Path,
                  dtype: str | None = None) -> MergeResult:
    """Merge in this process: load base+adapter, record probe logits, merge, save, reload, compare."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from gptoss_webui.mxfp4 import is_mxfp4_config

    started = time.time()
    adapter, out_dir = Path(adapter), Path(out_dir)
    dtype = dtype or _pick_dtype(base)
    model = PeftModel.from_pretrained(_load_base(base, dtype), str(adapter))
    model.eval()
    expected, routing = _probe_logits(model)
    with model.disable_adapter():
        effect = float((_probe_logits(model, routing)[0] - expected).abs().max())
    adapted = model.peft_config["default"]
    touches_experts = bool(adapted.target_parameters)
    if "router" in f"{adapted.target_modules} {adapted.target_parameters}":  # names, a set, a list or a regex
        routing = None  # the adapter changes the routers themselves: their choices are part of what is checked
    merged = model.merge_and_unload()
    device = str(merged.device)
    got, _ = _probe_logits(merged, routing)
    tmp = staging_dir(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    if is_mxfp4_config(json.loads((Path(base) / "config.json").read_text())) and not touches_experts:
        _save_keeping_mxfp4_experts(merged, base, tmp)
        experts = "MXFP4, the base's own codes (the adapter leaves the experts untouched)"
    else:
        merged.save_pretrained(tmp, safe_serialization=True)
        experts = f"{dtype} (the adapter changes the experts, so they are stored merged)" if touches_experts \
            else dtype
    del merged, model
    _free_device_cache()
    # The adapter folder carries the tokenizer (and chat template) the run trained with; else the base's.
    tok_src = adapter if (adapter / "tokenizer_config.json").is_file() else Path(base)
    AutoTokenizer.from_pretrained(str(tok_src)).save_pretrained(tmp)

    reloaded = _load_base(str(tmp), dtype, device)  # MXFP4 experts decoded exactly
    reload_diff = float((_probe_logits(reloaded, routing)[0] - got).abs().max())
    del reloaded
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    tolerance = TOLERANCE[dtype] * max(1.0, scale) if dtype in TOLERANCE else HALF_PRECISION_SHARE * effect
    result = MergeResult(out_dir=str(out_dir), base=base, adapter=str(adapter), dtype=dtype,
                         max_abs_diff=diff, max_abs_logit=scale, adapter_effect=effect, tolerance=tolerance,
                         reload_diff=reload_diff,
                         ok=diff <= tolerance and reload_diff <= RELOAD_TOLERANCE * max(1.0, scale),
                         seconds=time.time() - started, experts=experts)
    provenance = {**asdict(result), "adapter_digest": adapter_digest(adapter)}
    atomic_write_text(tmp / PROVENANCE_FILE, json.dumps(provenance, indent=1))
    if not result.ok:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MergeError(say("serving.merge.not_kept", summary=result.summary()))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return result


def staging_dir(out_dir: Path) -> Path:
    """Where the merge writes the folder before its checks pass (then renamed to out_dir)."""
    return out_dir.with_name(f".{out_dir.name}.merging")


def adapter_digest(adapter: Path) -> str:
    """Identifies an adapter's contents, so an unchanged adapter is not merged twice."""
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = adapter / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# --- from the UI / CLI process --------------------------------------------------------------------

def previous_merge(base: str, adapter: Path, out_dir: Path, dtype: str | None = None) -> MergeResult | None:
    """The recorded merge in out_dir when it was made from this base and this exact adapter (in `dtype`, if given)."""
    try:
        info = json.loads((out_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if (info.get("base") != base or info.get("adapter_digest") != adapter_digest(adapter)
            or (dtype is not None and info.get("dtype") != dtype) or not (out_dir / "config.json").is_file()):
        return None
    info.pop("adapter_digest", None)
    info.pop("reused", None)
    try:
        return MergeResult(**info, reused=True)
    except TypeError:
        return None


def merge_in_subprocess(base: str, adapter: str | Path, out_dir: str | Path, *, log_path: Path | None = None,
                        force: bool = False, timeout_s: float | None = None, dtype: str | None = None) -> MergeResult:
    """Run the merge in a child process (log to a file) and return its verified result. dtype: what the merged
    weights are computed and stored in (default: the base's own, _pick_dtype).

    Reuses out_dir when it already holds a verified merge of the same base and adapter in that dtype (unless force).
    """
    from gptoss_webui.sources import resolve_model

    adapter, out_dir = Path(adapter).resolve(), Path(out_dir).resolve()
    base = resolve_model(base)
    dtype = dtype or _pick_dtype(base)
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(say("serving.plan.not_adapter", adapter=adapter))
    if not force and (done := previous_merge(base, adapter, out_dir, dtype)):
        return done
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A merge killed on the way (timeout, a crashed app) leaves a partial copy of the weights, up to 39 GiB.
    shutil.rmtree(staging_dir(out_dir), ignore_errors=True)
    check_disk_space(base, adapter, out_dir.parent, dtype)
    if log_path is None:  # a run's merge logs into the run folder, like its training
        in_run = out_dir.name == "merged" and (out_dir.parent / "config.yaml").is_file()
        log_path = out_dir.parent / "merge.log" if in_run else out_dir.with_name(f"{out_dir.name}.merge.log")
    report = out_dir.with_name(f".{out_dir.name}.report.json")
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "gptoss_webui.serve.merge", "--base", base, "--adapter", str(adapter),
           "--out", str(out_dir), "--report", str(report), "--dtype", dtype]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_merge_env())
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise MergeError(say("serving.merge.timeout", seconds=timeout_s, log=log_path)) from None
        except BaseException:  # Ctrl-C: the merge must not run on in the background
            _kill_group(proc)
            raise
        finally:
            shutil.rmtree(staging_dir(out_dir), ignore_errors=True)  # renamed away when the merge succeeded
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        data = {"error": f"merge process exited with code {rc} without a report"}
    finally:
        report.unlink(missing_ok=True)
    if "error" in data:
        raise MergeError(say("serving.merge.error", error=data["error"], log=log_path))
    return MergeResult(**data)


def check_disk_space(base: str, adapter: Path, folder: Path, dtype: str | None = None) -> None:
    """Refuse before minutes of merging: the merged copy holds every weight in the merge dtype (an MXFP4
    gpt-oss base grows about 3x: 38.96 GiB in bf16 for gpt-oss-20b), except where the adapter leaves the experts
    untouched: that copy keeps the base's MXFP4 codes and is about the base's size."""
    from gptoss_webui.architecture import ArchitectureError, resolve_architecture
    from gptoss_webui.mxfp4 import is_mxfp4_config
    from gptoss_webui.serve.plan import PlanError, model_config, touches_experts

    try:
        changes_experts = touches_experts(adapter)
    except PlanError:  # the merge itself says what is wrong with the adapter
        changes_experts = True
    if is_mxfp4_config(model_config(base)) and not changes_experts:
        need = sum(p.stat().st_size for p in Path(base).glob("*.safetensors")) / 2**30
    else:
        try:
            params = resolve_architecture(base).total_params
        except ArchitectureError:
            return  # an architecture the estimator does not know: let the merge try
        need = params * {"float32": 4}.get(dtype or _pick_dtype(base), 2) / 2**30
    free = shutil.disk_usage(folder).free / 2**30
    if free < need:
        raise MergeError(say("serving.merge.disk", need=need, folder=folder, free=free, short=need - free))


def merge_run(run_dir: str | Path, force: bool = False) -> Path:
    """Merge a finished run's adapter into the base named in its config.yaml; returns run/merged."""
    from gptoss_webui.config import Recipe
    from gptoss_webui.runs import Run

    run = Run(Path(run_dir))
    if not run.config_path.is_file():
        raise MergeError(f"{run.path} is not a run folder (no config.yaml)")
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"run {run.name} has no finished adapter in {run.adapter_dir}: train it first")
    recipe = Recipe.from_yaml(run.config_path)
    result = merge_in_subprocess(recipe.train.model, run.adapter_dir, run.merged_dir,
                                 log_path=run.path / "merge.log", force=force)
    print(result.summary())
    return run.merged_dir


def _merge_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings in the log
    env.setdefault("PYTHONUNBUFFERED", "1")  # the log shows progress as it happens
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss_webui.serve.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=DTYPES)
    p.add_argument("--report", help="write the result (or the error) as JSON here")
    args = p.parse_args(argv)
    try:
        result = merge_adapter(args.base, args.adapter, args.out, args.dtype)
        data, rc = asdict(result), 0
        print(result.summary(), flush=True)
    except MergeError as exc:
        data, rc = {"error": str(exc)}, 1
    except Exception as exc:  # anything from transformers/peft: report it as one line, log the traceback
        import traceback

        traceback.print_exc()
        data, rc = {"error": f"merge failed: {type(exc).__name__}: {exc}"}, 1
    if args.report:
        atomic_write_text(Path(args.report), json.dumps(data, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
