#!/usr/bin/env bash
# The whole device command, from the repo root on the GPU host:
#   BUDGET_S=560 bash bench/gpu/run.sh env test e2e bench:core
# Stages run in the order given; one failing does not stop the next. BUDGET_S (seconds from the start) is the
# deadline that the e2e run and the benchmark plan against, so that the call ends inside its 600 s limit.
# Logs go to $OUT; at most 8 files come back from a device call: env.log, pytest.log, <name>.log and
# <name>_events.jsonl per e2e stage, bench_<grid>.log/.json/.md per bench stage. Pick stages accordingly.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$SECONDS
export DEADLINE=$(($(date +%s) + ${BUDGET_S:-560}))
# shellcheck source=/dev/null
source bench/gpu/setup.sh > "$OUT/env.log" 2>&1 || { echo "setup failed"; cat "$OUT/env.log"; exit 1; }
summary=()
for stage in "$@"; do
  echo "=== $stage (t=$((SECONDS - T0)) s)"
  case $stage in
    env)
      { nvidia-smi -L; df -h /tmp | tail -1; free -g | head -2; which python3 deepspeed
        python3 - <<'PY'
import importlib
import deepspeed, peft, pydantic, torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "deepspeed", deepspeed.__version__, "pydantic", pydantic.__version__, "cuda", torch.cuda.is_available())
for m in ["gptoss_webui.cli", "gptoss_webui.config", "gptoss_webui.presets", "gptoss_webui.train.launcher",
          "gptoss_webui.train.worker", "gptoss_webui.train.data", "gptoss_webui.train.lora",
          "gptoss_webui.train.zero", "gptoss_webui.train.memory", "gptoss_webui.train.attention",
          "gptoss_webui.train.supervise", "bench.train"]:
    importlib.import_module(m)
print("imports ok")
PY
        python3 -m gptoss_webui estimate --config presets/gpt-oss-20b-1xh100.yaml
      } >> "$OUT/env.log" 2>&1
      rc=$? ;;
    test)
      python3 -m bench.gpu.make_models tiny --tokenizer "${CARRY:-.gpu_carry}/tokenizer" > "$OUT/pytest.log" 2>&1
      timeout 300 python3 -m pytest tests/test_attention.py -v -p no:cacheprovider -W ignore >> "$OUT/pytest.log" 2>&1
      rc=$? ;;
    e2e)  # the exact command of bench/README.md
      NAME=e2e bash bench/gpu/e2e.sh
      rc=$? ;;
    e2e-packed)  # the same with packing: every sequence >= 128 tokens (see bench/README.md, flex decoding)
      NAME=e2e_packed bash bench/gpu/e2e.sh --set data.packing=true
      rc=$? ;;
    bench:*)
      IFS=: read -r _ grid only <<< "$stage"  # bench:GRID or bench:GRID:INDEX (that row, in its own process)
      budget=$((DEADLINE - $(date +%s) - ${ROW_S:-60}))  # no new row once a slow one could overrun
      python3 -m bench.train --grid "$grid" ${only:+--only "$only"} --tag "$grid" --append --out "$OUT" \
        --budget-s "$budget" 2>&1 | tee -a "$OUT/bench_$grid.log" | grep -v '^{'
      rc=${PIPESTATUS[0]} ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
  summary+=("$stage: exit $rc at t=$((SECONDS - T0)) s")
done
tail -n 4 "$OUT/pytest.log" 2>/dev/null
tail -n 25 "$OUT/env.log"
printf '%s\n' "${summary[@]}"
cat "$OUT"/bench_*.md 2>/dev/null
exit 0
