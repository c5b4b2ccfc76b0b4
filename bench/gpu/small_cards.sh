#!/usr/bin/env bash
# The device calls of the small-cards work (MXFP4-resident experts), on an nvidia-h200-x2 host:
#   bash bench/gpu/small_cards.sh a     # 20b checkpoint; GPU 0: 20b-shape correctness + bench grid `small`;
#                                       # GPU 1: the 1x16gb and 1x24gb presets under 16 / 24 GiB caps
#   bash bench/gpu/small_cards.sh b     # the 2x24gb preset on both GPUs (24 GiB caps); the 120b checkpoint and
#                                       # the gpt-oss-120b-1xh100 preset under a 79 GiB cap on one GPU
#   bash bench/gpu/small_cards.sh c     # ZeRO-3 (bf16) on both GPUs with expert LoRA, without and with offload
#   bash bench/gpu/small_cards.sh speed # one GPU: the MXFP4 decode kernel timed against torch.compile and a copy,
#                                       # its bit-exact test, then grids `mxfp4` (a process per row, profiled) and
#                                       # `cookbook`
# carry .gpu_carry. Everything lands in $OUT/results.tgz (a call brings back at most 8 files); the reply's tail
# shows the summaries. BUDGET_S: seconds from the start that every part plans against.
# shellcheck source=bench/gpu/call.sh
source bench/gpu/call.sh

capped() {  # NAME GPUS CAP_GIB PRESET [--set ...]: the real CLI, each rank's allocator capped
  local name=$1 gpus=$2 cap=$3 preset=$4; shift 4
  CUDA_VISIBLE_DEVICES=$gpus GPTOSS_CAP_GIB=$cap PYTHONPATH="$PWD/bench/gpu/cap:$PYTHONPATH" OUT=$R NAME=$name \
    PRESET=$preset bash bench/gpu/e2e.sh "$@" > "$R/$name.summary" 2>&1
  local rc=$?
  echo "== $name (GPUs $gpus, cap $cap GiB, $preset): exit $rc"; tail -n 12 "$R/$name.summary"
  return $rc
}

case ${1:?a, b, c or speed} in
  a)
    nvidia-smi -L > "$R/nvidia-smi.txt"; df -h /tmp >> "$R/nvidia-smi.txt"
    t=$(date +%s)
    CUDA_VISIBLE_DEVICES=0 python3 -m bench.gpu.make_models 20b --tokenizer "$TOKENIZER" --out "$CKPT" 2>&1 | tail -1
    echo "20b checkpoint: $(( $(date +%s) - t )) s, $(du -sh "$CKPT" | cut -f1)"
    python3 -m bench.gpu.long_rows --tokens 4200 --out /tmp/long.jsonl
    (  # GPU 1: the single-card presets, under the caps of the cards they are for
      DEADLINE=$(($(date +%s) + 240)) capped 1x16gb 1 16 gpt-oss-20b-1x16gb --set data.path=/tmp/long.jsonl \
        --set data.max_length=2048 --set optim.max_steps=4 --set save_steps=2 \
      || DEADLINE=$(($(date +%s) + 150)) capped 1x16gb_eager 1 16 gpt-oss-20b-1x16gb --set compile=false \
        --set data.path=/tmp/long.jsonl --set data.max_length=2048 --set optim.max_steps=3 --set save_steps=2
      capped 1x24gb 1 24 gpt-oss-20b-1x24gb --set data.path=/tmp/long.jsonl --set data.max_length=4096 \
        --set optim.max_steps=4 --set save_steps=10
    ) > "$R/lane1.txt" 2>&1 &
    lane1=$!
    # GPU 0: correctness on the 20b shape, then the speed and memory rows
    CUDA_VISIBLE_DEVICES=0 timeout "$(left 300)" python3 -m bench.mxfp4_check --out "$R" > "$R/check.log" 2>&1
    echo "== check exit $?"; tail -n 14 "$R/check.log"
    CUDA_VISIBLE_DEVICES=0 python3 -m bench.train --grid small --tag small --out "$R" --budget-s "$(left 80)" \
      > "$R/bench_small.log" 2>&1
    echo "== bench exit $?"; cat "$R/bench_small.md"
    wait "$lane1"; cat "$R/lane1.txt" ;;
  b)
    python3 -m bench.gpu.long_rows --tokens 4200 --out /tmp/long.jsonl
    capped 2x24gb 0,1 24 gpt-oss-20b-2x24gb --set data.path=/tmp/long.jsonl --set data.max_length=4096 \
      --set optim.max_steps=4 --set save_steps=10
    t=$(date +%s)
    CKPT120=/tmp/gpt-oss-120b-random
    CUDA_VISIBLE_DEVICES=0 python3 -m bench.gpu.make_models 120b --tokenizer "$TOKENIZER" --out "$CKPT120" 2>&1 | tail -1
    echo "120b checkpoint: $(( $(date +%s) - t )) s, $(du -sh "$CKPT120" | cut -f1)"
    CKPT=$CKPT120 capped 120b 0 79 gpt-oss-120b-1xh100 --set data.path=/tmp/long.jsonl --set data.max_length=4096 \
      --set optim.max_steps=3 --set save_steps=10 ;;
  c)  # ZeRO-3 on two GPUs with expert LoRA (bf16: ZeRO-3 shards bf16 weights): with offload under 24 GiB caps (the
      # estimator's pick for 24 GB cards), then without offload and without caps, forced, to measure its peak
    python3 -m bench.gpu.long_rows --tokens 4200 --out /tmp/long.jsonl
    CUDA_VISIBLE_DEVICES=0 python3 -m bench.gpu.make_models 20b --tokenizer "$TOKENIZER" --out "$CKPT" 2>&1 | tail -1
    z3=(--set deepspeed.stage=3 --set compile=false --set data.path=/tmp/long.jsonl --set data.max_length=2048
        --set optim.max_steps=3 --set save_steps=10)
    DEADLINE=$(($(date +%s) + $(left 0) / 2)) capped z3_offload 0,1 24 gpt-oss-20b-2x24gb "${z3[@]}" \
      --set deepspeed.offload_params=true --set deepspeed.offload_optimizer=true
    capped z3 0,1 139 gpt-oss-20b-2x24gb "${z3[@]}" --force ;;
  speed)  # SPEED_ROWS / COOKBOOK_ROWS: the rows of grids `mxfp4` / `cookbook` to run (default: all)
    nvidia-smi -L > "$R/nvidia-smi.txt"
    timeout 200 python3 -m bench.mxfp4_kernels --out "$R" > "$R/kernels.log" 2>&1
    echo "== kernels exit $?"; grep '^{' "$R/kernels.log"
    timeout 120 python3 -m pytest tests/test_mxfp4.py -k bit_exact -v -p no:cacheprovider -W ignore \
      > "$R/pytest_kernel.log" 2>&1
    echo "== pytest kernel exit $?"; tail -n 3 "$R/pytest_kernel.log"
    # shellcheck disable=SC2086
    timeout "$(left 20)" python3 -m bench.train --grid mxfp4 --tag mxfp4 --out "$R" --profile --budget-s "$(left 90)" \
      --only ${SPEED_ROWS:-0 1 2 3 4} > "$R/bench_mxfp4.log" 2>&1
    echo "== bench mxfp4 exit $?"; cat "$R/bench_mxfp4.md"
    # shellcheck disable=SC2086
    timeout "$(left 10)" python3 -m bench.train --grid cookbook --tag cookbook --out "$R" --budget-s "$(left 80)" \
      --only ${COOKBOOK_ROWS:-0 1} > "$R/bench_cookbook.log" 2>&1
    echo "== bench cookbook exit $?"; cat "$R/bench_cookbook.md" ;;
esac
pack_results
