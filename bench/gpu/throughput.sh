#!/usr/bin/env bash
# The device calls of the throughput work (issue 11), carry .gpu_carry; parts run in the order given:
#   bash bench/gpu/throughput.sh packing cold warm     # the flex packing test; the cookbook recipe cold, then warm
#   bash bench/gpu/throughput.sh long bench unpacked   # the longest sequences under a 79 GiB cap; bench.train at the
#                                                      # cookbook's length; the recipe without packing (40 steps)
#   bash bench/gpu/throughput.sh two_gpus              # nvidia-h200-x2: the recipe on two GPUs
#   bash bench/gpu/throughput.sh unsloth ours4096      # carry .gpu_carry .unsloth_carry: Unsloth's LoRA (bf16, 4bit)
#                                                      # at 4096, then our two rows at 4096 (bf16, MXFP4 experts)
#   bash bench/gpu/throughput.sh unsloth_bnb           # the same: Unsloth's bitsandbytes 4-bit on a bf16 checkpoint
# A call made within 30 s of the last finds that host's /tmp (checkpoints, compile caches) as it was left.
# UNSLOTH_ARGS, BENCH_ARGS: more flags for bench.unsloth_row and bench.train (e.g. --profile, in both: where a step's
# time goes). Everything lands in $OUT/results.tgz; the reply's tail shows the summaries. BUDGET_S: seconds every part plans against.
# shellcheck source=bench/gpu/call.sh
source bench/gpu/call.sh
CKPT_BF16=/tmp/gpt-oss-20b-unquantized  # unsloth_bnb: the 20b in bf16, no quantization_config (make_models 20b-bf16)

cookbook() {  # NAME GPUS [--set ...]: the recipe through the real CLI, bounded by the deadline
  local name=$1 gpus=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpus timeout "$(left 10)" python3 -m bench.cookbook run --model "$CKPT" \
    --rows /tmp/cookbook.jsonl --out "$R" --name "$name" --runs-dir "$RUNS" "$@" > "$R/$name.out" 2>&1
  echo "== cookbook $name (GPUs $gpus): exit $?"; cat "$R/$name.json" 2>/dev/null || tail -n 20 "$R/$name.out"
}

unsloth_rows() {  # OUT MODEL VARIANT...: bench/unsloth_row.py, a process per variant, offline, no statistics ping.
  # The wheels (bench/gpu/prepare_unsloth.sh) go to a folder of their own, on PYTHONPATH for this command only,
  # so the other parts keep the image's packages.
  local out=$1 model=$2; shift 2
  mkdir -p "$out"
  [ -d /tmp/site-unsloth/unsloth ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site-unsloth .unsloth_carry/*.whl > "$R/unsloth_install.log" 2>&1 || tail -n 5 "$R/unsloth_install.log"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$PYTHONPATH:/tmp/site-unsloth" timeout "$(left 5)" python3 -m bench.unsloth_row \
    --model "$model" --out "$out" --fallback --variant "$@" --timeout-s "${UNSLOTH_ROW_S:-300}" \
    --budget-s "$(left 15)" ${UNSLOTH_ARGS:-} > "$out/unsloth.log" 2>&1
  echo "== unsloth ($model) exit $?"; tail -n 4 "$out/unsloth.log"
}

prepare() {  # the 20b and tiny checkpoints and the cookbook rows, unless this host kept them from a call before
  [ -f "$CKPT/config.json" ] || python3 -m bench.gpu.make_models 20b --tokenizer "$TOKENIZER" --out "$CKPT" \
    > "$R/make.log" 2>&1
  [ -f "$GPTOSS_WORKSPACE/models/tiny-gpt-oss/config.json" ] \
    || python3 -m bench.gpu.make_models tiny --tokenizer "$TOKENIZER" >> "$R/make.log" 2>&1
  [ -f /tmp/cookbook.jsonl ] || python3 -m bench.cookbook rows --out /tmp/cookbook.jsonl
}

case " $* " in *" cold "*|*" warm "*|*" two_gpus "*|*" unpacked "*|*" unsloth "*) prepare ;; esac
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
    unsloth)  # Unsloth's gpt-oss LoRA on our checkpoint at 4096: bf16 experts, then load_in_4bit (MXFP4 experts kept)
      unsloth_rows "$R" "$CKPT" ${UNSLOTH_VARIANTS:-bf16 4bit} ;;
    unsloth_bnb)  # Unsloth's bitsandbytes 4-bit, which needs an unquantized checkpoint: a bf16 one (39 GiB more disk)
      [ -f "$CKPT_BF16/config.json" ] || python3 -m bench.gpu.make_models 20b-bf16 --tokenizer "$TOKENIZER" \
        --out "$CKPT_BF16" >> "$R/make.log" 2>&1 || tail -n 5 "$R/make.log"
      unsloth_rows "$R/bnb" "$CKPT_BF16" 4bit ;;
    ours4096)  # our rows Unsloth's are compared with: seq 4096, preset LoRA, compiled; bf16 experts, then MXFP4
      CUDA_VISIBLE_DEVICES=0 timeout "$(left 5)" python3 -m bench.train --grid mxfp4 --only 1 2 --tag ours4096 \
        --out "$R" --budget-s "$(left 100)" ${BENCH_ARGS:-} > "$R/bench_ours4096.log" 2>&1
      echo "== bench ours4096 exit $?"; cat "$R/bench_ours4096.md" ;;
  esac
done
pack_results
