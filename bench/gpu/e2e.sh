#!/usr/bin/env bash
# End to end on the GPU host: the real CLI -> launcher -> supervise -> deepspeed -> worker, with a preset
# (PRESET, default gpt-oss-20b-1xh100) on a random-weight checkpoint in the released layout (CKPT).
# Needs bench/gpu/setup.sh sourced. Later --set values override the defaults below.
#   NAME=e2e bash bench/gpu/e2e.sh [--set key=value ...]
# Leaves two files in $OUT: $NAME.log (CLI output, status, files, train.log tail) and ${NAME}_events.jsonl.
set -u
NAME=${NAME:-e2e}
OUT=${OUT:-/tmp/out}
CKPT=${CKPT:-/tmp/gpt-oss-20b-random}  # 12.8 GiB: local disk, not $OUT
RUNS=${RUNS:-/tmp/gptoss-runs}  # checkpoints stay here; only events and the log tail go to $OUT
[ -f "$CKPT/config.json" ] || python3 -m bench.gpu.make_models 20b --tokenizer "$TOKENIZER" \
  --out "$CKPT" || exit 1
run="$RUNS/$NAME"
# Copy progress out every 10 s: if the call's time limit kills this script, $OUT still holds it.
( while sleep 10; do cp "$run/events.jsonl" "$OUT/${NAME}_events.jsonl" 2>/dev/null
    tail -n 150 "$run/train.log" > "$OUT/$NAME.train_tail.log" 2>/dev/null; done ) &
copier=$!
left=$(( ${DEADLINE:-$(($(date +%s) + 450))} - $(date +%s) - 15 ))
timeout "$left" python3 -m gptoss_webui train --config "presets/${PRESET:-gpt-oss-20b-1xh100}.yaml" \
  --set model="$CKPT" --set data.path=demo:harmony --set data.max_length=1024 --set optim.max_steps=6 \
  --set save_steps=3 --set runs_dir="$RUNS" --set run_name="$NAME" "$@" 2>&1 | tee "$OUT/$NAME.log"
rc=${PIPESTATUS[0]}
kill "$copier"
if [ "$rc" = 124 ]; then  # out of time; the run is detached (own session): end its group, not the GPU's future
  pgid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["pgid"])' "$run/status.json")
  kill -KILL -- "-$pgid" 2>/dev/null
fi
{ echo "exit code: $rc"; echo "status.json:"; cat "$run/status.json"; echo; ls -laR "$run/adapter" "$run/checkpoints"
} >> "$OUT/$NAME.log" 2>&1
cp "$run/events.jsonl" "$OUT/${NAME}_events.jsonl" 2>/dev/null
{ echo "--- tail of train.log"; tail -n 150 "$run/train.log"; } >> "$OUT/$NAME.log" 2>&1
rm -f "$OUT/$NAME.train_tail.log"  # only kept if this script is killed before this line
python3 - "$run/events.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["type"] == "step":
        print(f"step {e['step']}/{e['total']} loss {e['loss']:.4f} tokens/s {e['tokens_per_s']} "
              f"peak {e['peak_mem_gib']} GiB elapsed {e['elapsed_s']} s")
    elif e["type"] in ("start", "done", "error", "stopped", "checkpoint"):
        print(e["type"], {k: v for k, v in e.items() if k not in ("log_tail", "config")})
PY
exit "$rc"
