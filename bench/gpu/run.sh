#!/usr/bin/env bash
# The whole device command, from the repo root on the GPU host:
#   BUDGET_S=560 bash bench/gpu/run.sh env test e2e bench:core
#   BUDGET_S=570 bash bench/gpu/run.sh stash vllm serve-cold          # the serve stages: bench/README.md, Commands
# Stages run in the order given; one failing does not stop the next. BUDGET_S (seconds from the start) is the
# deadline that the e2e run and the benchmark plan against, so that the call ends inside its 600 s limit.
# Logs go to $OUT; at most 8 files come back from a device call: env.log, pytest.log, <name>.log and
# <name>_events.jsonl per e2e stage, bench_<grid>.log/.json/.md per bench stage, serve_<name>.tgz per serve stage.
# Pick stages accordingly.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$SECONDS
export DEADLINE=$(($(date +%s) + ${BUDGET_S:-560}))
export CKPT=${CKPT:-/tmp/gpt-oss-20b-random} RUNS=${RUNS:-/tmp/gptoss-runs}
# shellcheck source=/dev/null
source bench/gpu/setup.sh > "$OUT/env.log" 2>&1 || { echo "setup failed"; cat "$OUT/env.log"; exit 1; }
# vLLM as the `vllm` stage of this call or of an earlier one on this host unpacked it in /tmp/site (a later call's
# serve stages import it from there too). The trimmed vLLM has no flashinfer: its sampler must not be asked for.
use_vllm() {
  [ -d /tmp/site/vllm ] || return 0
  case ":$PYTHONPATH:" in *:/tmp/site:*) ;; *) export PYTHONPATH="$PYTHONPATH:/tmp/site" ;; esac
  export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1
}
# bench/serve.py into /tmp/serve/NAME (kept: later calls on this host read it with --previous), packed as
# $OUT/serve_NAME.tgz; prints its tables. Adapters and merges live in /tmp/serve-adapters.
serve_bench() {
  local name=$1 dir=/tmp/serve/$1; shift
  use_vllm
  rm -rf "$dir" && mkdir -p "$dir"
  # shellcheck disable=SC2086  # SERVE_ARGS: several arguments
  python3 -m bench.serve --model "$CKPT" --adapters-dir /tmp/serve-adapters --out "$dir" "$@" ${SERVE_ARGS:-} \
    --budget-s $((DEADLINE - $(date +%s) - 25)) > "$dir/serve.log" 2>&1
  rc=$?
  tar -czf "$OUT/serve_$name.tgz" -C /tmp/serve "$name"
  grep -E '^(Traceback|[A-Za-z]*Error)' "$dir/serve.log" | tail -n 5
  cat "$dir/bench_serve.md" 2>/dev/null || tail -n 20 "$dir/serve.log"
}
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
      python3 -m bench.gpu.make_models tiny --tokenizer "$TOKENIZER" > "$OUT/pytest.log" 2>&1
      timeout 300 python3 -m pytest tests/test_attention.py -v -p no:cacheprovider -W ignore >> "$OUT/pytest.log" 2>&1
      rc=$? ;;
    e2e)  # the exact command of bench/README.md
      NAME=e2e bash bench/gpu/e2e.sh
      rc=$? ;;
    e2e-packed)  # the same with packing: every sequence >= 128 tokens (see bench/README.md, flex decoding)
      NAME=e2e_packed bash bench/gpu/e2e.sh --set data.packing=true
      rc=$? ;;
    stash)  # keep the vLLM part this call carried (.vllm_gpu/a, b or c) for the `vllm` stage of a later call
      mkdir -p /tmp/parts && cp .vllm_gpu/*/* /tmp/parts/ && ls -la /tmp/parts
      rc=$? ;;
    model20b)  # the random-weight gpt-oss-20b in the released layout (MXFP4 experts, 12.8 GiB): e2e, merge, serve
      [ -f "$CKPT/config.json" ] || python3 -m bench.gpu.make_models 20b --tokenizer "$TOKENIZER" --out "$CKPT"
      rc=$? ;;
    memorize)  # the CLI trains the 1xh100 preset's adapter (attention + experts of layers 7/15/23) until it
      # reproduces the 5 answers of bench/data/memorize.jsonl: decisive logits for serve's greedy check (--greedy-data).
      # MEMORIZE_RUNS="NAME:LR ...", each into $RUNS/NAME, one after another (the app queues runs on one GPU), about
      # 170 s each. On an H200 (2026-12-01): lr 2e-4 reached loss 0.03-0.06 in 300 steps, 5e-4 0.26-0.35, and 2e-3
      # stalled at 7 (bench/results/2026-12-01-h200-memorize-2.json).
      rc=0
      for run in ${MEMORIZE_RUNS:-memorize:0.0002}; do
        NAME=${run%%:*} bash bench/gpu/e2e.sh --set data.path=bench/data/memorize.jsonl --set data.max_length=256 \
          --set optim.max_steps=${MEMORIZE_STEPS:-300} --set optim.learning_rate=${run#*:} \
          --set optim.lr_scheduler=constant_with_warmup --set optim.warmup_ratio=0.02 \
          --set optim.gradient_accumulation_steps=1 --set save_steps=100000 --set compile=false \
          | grep -E '^(step|done|error)' | awk 'NR % 25 == 0 || !/^step/'
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done ;;
    merge)  # the CLI's merge of the e2e run's adapter (run/merged), verified against HF+peft logits
      python3 -m gptoss_webui merge --run "$RUNS/e2e" > "$OUT/merge.log" 2>&1
      rc=$?; tail -n 5 "$OUT/merge.log" ;;
    vllm)  # unpack vLLM from the stashed parts; later stages (serve) import it from /tmp/site
      cat /tmp/parts/vllm.tar.xz.part* > /tmp/vllm.tar.xz && cp /tmp/parts/deps.tar.xz /tmp/ \
        && (cd /tmp && sha256sum -c /tmp/parts/SHA256SUMS) && rm -rf /tmp/site && mkdir -p /tmp/site \
        && tar -xJf /tmp/vllm.tar.xz -C /tmp/site && tar -xJf /tmp/deps.tar.xz -C /tmp/site \
        && python3 -m compileall -q -j 0 /tmp/site > /dev/null
      # compileall: the bytecode a pip install leaves. The image sets PYTHONDONTWRITEBYTECODE, so without it every
      # engine start compiled vLLM's modules from source (bench/README, eighth session: importing vLLM's server took
      # 24-25 s without it, 21 s with it).
      rc=$?
      use_vllm
      python3 -c "import vllm; print('vllm', vllm.__version__)" || rc=1 ;;
    bytecode)  # byte-compile the image's own site-packages, as the Dockerfile does for the app's image: the GPU image
      # sets PYTHONDONTWRITEBYTECODE and ships torch, numpy and sympy without bytecode, so every engine start compiles
      # their sources (5.5 s of a warm start's API server in its stack samples, bench/README ninth session). Files
      # that are not Python 3 source fail to compile and are skipped, so compileall's status says nothing here.
      python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        > /dev/null 2>&1
      rc=0 ;;
    lora-kernels)  # vLLM's LoRA shrink/expand kernels tuned for the attention of $CKPT into /tmp/lora-tuned (kept for
      # a later serve stage: --engine-env VLLM_TUNED_CONFIG_FOLDER=/tmp/lora-tuned), its table and rows into $OUT
      use_vllm
      python3 -m bench.lora_kernels --model "$CKPT" --out /tmp/lora-tuned \
        --budget-s $((DEADLINE - $(date +%s) - 30)) ${LORA_KERNELS_ARGS:-} \
        > "$OUT/lora_kernels.log" 2>&1
      rc=$?
      cp /tmp/lora-tuned/*.json /tmp/lora-tuned/*.md "$OUT/" 2>/dev/null
      tail -n 5 "$OUT/lora_kernels.log"; cat /tmp/lora-tuned/lora_kernels.md 2>/dev/null ;;
    serve-prep)  # no vLLM needed: the adapters (attention + experts) and their merge, kept for serve-merged
      serve_bench prep --stages merge ;;
    serve-cold)  # the first engine start on this host: base, both hot-loaded adapters, vllm bench serve, then the same
      # engine started again (warm compile caches) while the budget lasts
      serve_bench cold --stages base,hotload_attn,hotload_experts,vllm_bench,warm
      # When the LoRA-enabled engine did not start at all, the rest of the call measures the base with LoRA off.
      python3 -c 'import json, sys; row = json.load(open(sys.argv[1]))["rows"][0]; sys.exit(row.get("start_s") is None)' \
        /tmp/serve/cold/bench_serve.json || serve_bench cold-plain --stages plain,vllm_bench ;;
    serve-merged)  # after serve-cold (which measured the warm start): the merged model, HF greedy, HF+peft
      serve_bench merged --stages merge,merged,hf --previous /tmp/serve/cold/bench_serve.json ;;
    serve-all)  # one call after serve-prep: the merge (reused), the LoRA engine's base and experts rows, the merged
      # model's engine, HF greedy and HF+peft's tokens; SERVE_STAGES overrides the stages
      serve_bench all --stages "${SERVE_STAGES:-merge,base,hotload_experts,merged,hf}" ;;
    serve-hf)  # HF greedy and HF+peft alone, against serve-merged's rows (when serve-merged ran out of time for it)
      serve_bench hf --stages hf --previous /tmp/serve/merged/bench_serve.json ;;
    serve-plain)  # the base on an engine with LoRA off (what enabling LoRA costs the base), and vllm bench serve on it
      serve_bench plain --stages plain,vllm_bench --previous /tmp/serve/cold/bench_serve.json ;;
    serve-moe:*)  # serve-moe:BACKEND: base and the attention + experts adapter with vLLM's --moe-backend BACKEND
      serve_bench "moe-${stage#serve-moe:}" --stages base,hotload_experts --engine-arg "moe-backend=${stage#serve-moe:}" ;;
    serve | serve:*)  # bench/serve.py with SERVE_ARGS only (e.g. --adapter "$RUNS/e2e/adapter" --stages
      # base,hotload_experts), into /tmp/serve/serve; serve:NAME into /tmp/serve/NAME, with SERVE_ARGS_<NAME> added
      # (serve:hf reads SERVE_ARGS_hf)
      name=${stage#serve:}; extra=SERVE_ARGS_$name
      # shellcheck disable=SC2086  # several arguments
      serve_bench "$name" ${!extra:-} ;;
    bench:*)
      IFS=: read -r _ grid only <<< "$stage"  # bench:GRID or bench:GRID:INDEX (that row, in its own process)
      budget=$((DEADLINE - $(date +%s) - ${ROW_S:-60}))  # no new row once a slow one could overrun
      python3 -m bench.train --grid "$grid" ${only:+--only "$only"} --tag "$grid" --append --out "$OUT" \
        --budget-s "$budget" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench_$grid.log" | grep -v '^{'
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
