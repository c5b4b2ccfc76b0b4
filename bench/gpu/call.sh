# Sourced by the scripts of one device call (small_cards.sh, throughput.sh): the results folder, one deadline
# that every part plans against (BUDGET_S seconds from now), the carried wheels installed, and `pack_results`,
# which puts everything in $OUT/results.tgz (a call brings back at most 8 files).
set -u
OUT=${OUT:-/tmp/out}
R=/tmp/res
mkdir -p "$OUT" "$R"
export DEADLINE=${DEADLINE:-$(($(date +%s) + ${BUDGET_S:-560}))}  # set by the caller: one deadline for several scripts
# shellcheck source=/dev/null
source bench/gpu/setup.sh > "$R/env.log" 2>&1 || { tail -20 "$R/env.log"; exit 1; }
export CKPT=/tmp/gpt-oss-20b-random RUNS=/tmp/gptoss-runs
# Seconds left before the deadline, less $1; at least 1, so that `timeout "$(left N)"` is always valid.
left() { local s=$((DEADLINE - $(date +%s) - ${1:-0})); echo $((s > 1 ? s : 1)); }
pack_results() { tar -czf "$OUT/results.tgz" -C "$R" .; ls -la "$OUT"; }
