#!/usr/bin/env bash
# The device calls of the throughput work (issue 11), on an nvidia-h200-x2 host, carry .gpu_carry:
#   bash bench/gpu/throughput.sh a   # checkpoints; GPU 1: the flex packing test, then bench.train --grid long under a
#                                    # 79 GiB cap; GPU 0: the cookbook recipe cold, then warm, then bench --grid cookbook
#   bash bench/gpu/throughput.sh b   # right after a (same host, its /tmp kept): the cookbook on two GPUs, and on one
#                                    # GPU without packing (40 steps)
# Everything lands in $OUT/results.tgz; the reply's tail shows the summaries. BUDGET_S: seconds every part plans against.
set -u
OUT=${OUT:-/tmp/out}
R=/tmp/res
mkdir -p "$OUT" "$R"
export DEADLINE=$(($(date +%s) + ${BUDGET_S:-560}))
# shellcheck source=/dev/null
source bench/gpu/setup.sh > "$R/env.log" 2>&1 || { tail -20 "$R/env.log"; exit 1; }
export CKPT=/tmp/gpt-oss-20b-random RUNS=/tmp/gptoss-runs
left() { echo $((DEADLINE - $(date +%s) - ${1:-0})); }

cookbook() {  # NAME GPUS [--set ...]: the recipe through the real CLI, bounded by the deadline
  local name=$1 gpus=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpus timeout "$(left 10)" python3 -m bench.cookbook run --model "$CKPT" \
    --rows /tmp/cookbook.jsonl --out "$R" --name "$name" --runs-dir "$RUNS" "$@" > "$R/$name.out" 2>&1
  echo "== cookbook $name (GPUs $gpus): exit $?"; cat "$R/$name.json" 2>/dev/null || tail -n 20 "$R/$name.out"
}

case ${1:?a or b} in
  a)
    nvidia-smi -L > "$R/nvidia-smi.txt"
    [ -f "$CKPT/config.json" ] || CUDA_VISIBLE_DEVICES=0 python3 -m bench.gpu.make_models 20b \
      --tokenizer "$TOKENIZER" --out "$CKPT" > "$R/make.log" 2>&1
    python3 -m bench.gpu.make_models tiny --tokenizer "$TOKENIZER" >> "$R/make.log" 2>&1
    python3 -m bench.cookbook rows --out /tmp/cookbook.jsonl
    (  # GPU 1: packing under flex_attention, then the longest sequences under an 80 GB card's cap
      CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m pytest tests/test_packing.py -v -p no:cacheprovider -W ignore \
        > "$R/pytest_packing.log" 2>&1
      echo "== pytest exit $?"; tail -n 6 "$R/pytest_packing.log"
      CUDA_VISIBLE_DEVICES=1 LOCAL_RANK=0 GPTOSS_CAP_GIB=79 PYTHONPATH="$PWD/bench/gpu/cap:$PYTHONPATH" \
        python3 -m bench.train --grid long --tag long --out "$R" --warmup 1 --steps 2 --budget-s "$(left 150)" \
        > "$R/bench_long.log" 2>&1
      echo "== bench long exit $?"; cat "$R/bench_long.md"
    ) > "$R/lane1.txt" 2>&1 &
    lane1=$!
    cookbook cold 0
    cookbook warm 0
    CUDA_VISIBLE_DEVICES=0 timeout "$(left 5)" python3 -m bench.train --grid cookbook --tag cookbook --out "$R" \
      > "$R/bench_cookbook.log" 2>&1
    echo "== bench cookbook exit $?"; cat "$R/bench_cookbook.md"
    wait "$lane1"; cat "$R/lane1.txt" ;;
  b)
    [ -f /tmp/cookbook.jsonl ] || python3 -m bench.cookbook rows --out /tmp/cookbook.jsonl
    [ -f "$CKPT/config.json" ] || python3 -m bench.gpu.make_models 20b --tokenizer "$TOKENIZER" --out "$CKPT" \
      > "$R/make.log" 2>&1
    cookbook two_gpus 0,1 --set num_gpus=2
    cookbook unpacked 0 --set data.packing=false --set optim.max_steps=40 ;;
esac
tar -czf "$OUT/results.tgz" -C "$R" .
ls -la "$OUT"
