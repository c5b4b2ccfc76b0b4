#!/usr/bin/env bash
# The device calls of the throughput work (issue 11), carry .gpu_carry; parts run in the order given:
#   bash bench/gpu/throughput.sh packing cold warm     # the flex packing test; the cookbook recipe cold, then warm
#   bash bench/gpu/throughput.sh long bench unpacked   # the longest sequences under a 79 GiB cap; bench.train at the
#                                                      # cookbook's length; the recipe without packing (40 steps)
#   bash bench/gpu/throughput.sh two_gpus              # nvidia-h200-x2: the recipe on two GPUs
# A call made within 30 s of the last finds that host's /tmp (checkpoints, compile caches) as it was left.
# Everything lands in $OUT/results.tgz; the reply's tail shows the summaries. BUDGET_S: seconds every part plans against.
# shellcheck source=bench/gpu/call.sh
source bench/gpu/call.sh

cookbook() {  # NAME GPUS [--set ...]: the recipe through the real CLI, bounded by the deadline
  local name=$1 gpus=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpus timeout "$(left 10)" python3 -m bench.cookbook run --model "$CKPT" \
    --rows /tmp/cookbook.jsonl --out "$R" --name "$name" --runs-dir "$RUNS" "$@" > "$R/$name.out" 2>&1
  echo "== cookbook $name (GPUs $gpus): exit $?"; cat "$R/$name.json" 2>/dev/null || tail -n 20 "$R/$name.out"
}

prepare() {  # the 20b and tiny checkpoints and the cookbook rows, unless this host kept them from a call before
  [ -f "$CKPT/config.json" ] || python3 -m bench.gpu.make_models 20b --tokenizer "$TOKENIZER" --out "$CKPT" \
    > "$R/make.log" 2>&1
  [ -f "$GPTOSS_WORKSPACE/models/tiny-gpt-oss/config.json" ] \
    || python3 -m bench.gpu.make_models tiny --tokenizer "$TOKENIZER" >> "$R/make.log" 2>&1
  [ -f /tmp/cookbook.jsonl ] || python3 -m bench.cookbook rows --out /tmp/cookbook.jsonl
}

case " $* " in *" cold "*|*" warm "*|*" two_gpus "*|*" unpacked "*) prepare ;; esac
nvidia-smi -L > "$R/nvidia-smi.txt"
for part in "$@"; do
  case $part in
    packing)  # the packed-vs-separate test, flex_attention's block mask included
      timeout 240 python3 -m pytest tests/test_packing.py -v -p no:cacheprovider -W ignore > "$R/pytest_packing.log" 2>&1
      echo "== pytest exit $?"; tail -n 6 "$R/pytest_packing.log" ;;
    cold)  # the recipe on one GPU, launch to adapter
      cookbook cold 0 ;;
    warm)  # after `cold`, with torch's compile caches in the workspace: launch to step 1 (3 steps)
      cookbook warm 0 --set optim.max_steps=3 ;;
    two_gpus)
      cookbook two_gpus 0,1 --set num_gpus=2 ;;
    unpacked)
      cookbook unpacked 0 --set data.packing=false --set optim.max_steps=40 ;;
    long)  # the longest sequences under an 80 GB card's cap
      CUDA_VISIBLE_DEVICES=0 LOCAL_RANK=0 GPTOSS_CAP_GIB=79 PYTHONPATH="$PWD/bench/gpu/cap:$PYTHONPATH" \
        timeout "$(left 10)" python3 -m bench.train --grid long --tag long --out "$R" --warmup 1 --steps 2 \
        --only ${LONG_ROWS:-0 1 2 3 4} --budget-s "$(left 150)" > "$R/bench_long.log" 2>&1
      echo "== bench long exit $?"; cat "$R/bench_long.md" ;;
    bench)  # bench/train.py at the cookbook's packed length, for the pipeline's ratio
      CUDA_VISIBLE_DEVICES=0 timeout "$(left 5)" python3 -m bench.train --grid cookbook --tag cookbook --out "$R" \
        > "$R/bench_cookbook.log" 2>&1
      echo "== bench cookbook exit $?"; cat "$R/bench_cookbook.md" ;;
  esac
done
pack_results
