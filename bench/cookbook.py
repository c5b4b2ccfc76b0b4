"""The OpenAI cookbook's gpt-oss-20b fine-tune as a benchmark: launch to adapter through the real CLI, phase by phase.

    python -m bench.cookbook rows --out /tmp/cookbook.jsonl [--count 1000]
    python -m bench.cookbook run --model CKPT --rows /tmp/cookbook.jsonl --out DIR [--name N] [--set key=value ...]

The recipe (cookbook.openai.com/articles/gpt-oss/fine-tune-transfomers): 1,000 HuggingFaceH4/Multilingual-Thinking
rows, one epoch, LoRA r=8 on attention plus the experts of layers 7/15/23, max length 2048, 4 sequences a device
and 4 accumulation steps: the `gpt-oss-20b-1xh100` preset with those four values set (RECIPE). The GPU hosts cannot
download the dataset, so `rows` writes 1,000 synthetic harmony rows (developer, user, assistant with thinking)
whose token lengths follow a log-normal with a median of 1,000 tokens and sigma 0.5 (mean about 1,130), clipped to
150-4,000 tokens. That is derived from the dataset card: 8.9 MB for 1,000 rows, about half of it in the `messages`
column (the other columns repeat the same text), so about 4.4 kB a conversation, about 1,100 tokens at 4 characters
a token.
Each word is one o200k token (bench.gpu.long_rows's words). Rendered by the harmony template, the 1,000 rows
measure: median 1,115 tokens, mean 1,230, 267-4,083; 84 rows are cut at 2048; 1,176,667 tokens are trained on.

`run` launches `python -m gptoss_webui train` and reads the run's events.jsonl afterwards. Phases:
  setup        launch -> the `start` event: launcher, imports, data (`setup_s.data`), model load and LoRA
               (`setup_s.model`), DeepSpeed's engine
  first step   `start` -> step 1: compiling the layers, plus the step
  steps        step 1 -> the last step, less the checkpoint saves
  saves        the `checkpoint` events' `save_s`
  final save   the last step -> `done` (the adapter on disk)
A second `run` with the same workspace measures a warm start: torch's compile caches are kept in the workspace.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu.long_rows import WORDS

ROWS = 1000
MEDIAN_TOKENS, SIGMA, MIN_TOKENS, MAX_TOKENS = 1000, 0.5, 150, 4000
PRESET = "gpt-oss-20b-1xh100"
# The cookbook's batch too: 4 sequences a device and 4 accumulation steps (16 a step); ours are packed blocks.
RECIPE = ["data.max_length=2048", "optim.epochs=1", "optim.max_steps=-1", "optim.micro_batch_size=4",
          "optim.gradient_accumulation_steps=4"]


def rows(count: int = ROWS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = int(min(MAX_TOKENS, max(MIN_TOKENS, math.exp(rng.gauss(math.log(MEDIAN_TOKENS), SIGMA)))))
        question, thinking = max(10, n // 10), n * 6 // 10
        answer = n - question - thinking

        def words(k: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(k))

        out.append({"messages": [
            {"role": "developer", "content": "reasoning language: German"},
            {"role": "user", "content": f"Question {i}: " + words(question)},
            {"role": "assistant", "thinking": words(thinking), "content": words(answer)},
        ]})
    return out


def phases(events: list[dict], launched: float) -> dict:
    """Seconds per phase, from the run's events (see the module's docstring)."""
    start = next((e for e in events if e["type"] == "start"), None)
    if start is None:
        return {"final": events[-1]["type"] if events else "no events"}
    steps = [e for e in events if e["type"] == "step"]
    saves = [e for e in events if e["type"] == "checkpoint"]
    final = events[-1]
    out = {"setup_s": start["time"] - launched, "setup_data_s": start["setup_s"]["data"],
           "setup_model_s": start["setup_s"]["model"], "steps": len(steps), "final": final["type"]}
    if steps:
        saves_s = sum(e["save_s"] for e in saves if e["step"] < steps[-1]["step"])
        out.update(first_step_s=steps[0]["time"] - start["time"],
                   steps_s=steps[-1]["time"] - steps[0]["time"] - saves_s, saves_s=saves_s, saves=len(saves),
                   tokens_per_s_median=statistics.median(e["tokens_per_s"] for e in steps[1:] or steps),
                   peak_mem_gib=max(e["peak_mem_gib"] for e in steps))
    if final["type"] == "done":
        out.update(final_save_s=final["time"] - steps[-1]["time"], launch_to_adapter_s=final["time"] - launched)
    out["data"] = start.get("data")
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def run(model: str, rows_path: Path, out: Path, name: str, extra: list[str], runs_dir: Path) -> dict:
    sets = [f"model={model}", f"data.path={rows_path}", f"runs_dir={runs_dir}", f"run_name={name}",
            *RECIPE, *extra]
    cmd = [sys.executable, "-m", "gptoss_webui", "train", "--config", PRESET]
    for s in sets:
        cmd += ["--set", s]
    launched = time.time()
    log = out / f"{name}.log"
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    events_path = runs_dir / name / "events.jsonl"
    events = [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.exists() else []
    (out / f"{name}_events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events
                                                      if e["type"] != "step" or e["step"] % 25 == 1))
    result = {"name": name, "exit": rc, "command": " ".join(cmd), **phases(events, launched)}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("rows")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=ROWS)
    p = sub.add_parser("run")
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="cookbook")
    p.add_argument("--runs-dir", type=Path, default=Path("/tmp/gptoss-runs"))
    p.add_argument("--set", action="append", default=[], dest="extra")
    args = parser.parse_args()
    if args.cmd == "rows":
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows(args.count)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.model, args.rows, args.out, args.name, args.extra, args.runs_dir), indent=1))


if __name__ == "__main__":
    main()
