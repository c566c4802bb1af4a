#!/usr/bin/env bash
# The three measurements a borrowed GPU is for, in order, each under its own time limit so that one that hangs
# leaves time for the next (about 14 minutes in all on one H100/H200):
#   1. the paper profile's dry run on CUDA (bf16; then with compile = true if part 1 left time): each stage's time
#      and peak memory, and the time-to-paper projection for this GPU;
#   2. a styled pair at the paper's evaluation count (960 RePaint evaluations + 120 guided styling steps), eager and
#      compiled, at the batch sizes the bench finds best (`diffusegen bench all`, its summary table);
#   3. the fast sampler at a scale beyond the demo: a 64-px full-data model trained from scratch on the GPU for a
#      few minutes on every training image of DATA, then FID of the paper's sampler against the fast one
#      (ddim η0 T/2 j/2 r=2) on the same seeds and IMAGES inpainted images (`diffusegen bench fast-sampler`).
# Everything lands in figures/bench/gpu-<name>/ (a summary.txt at the end lists what each part wrote).
#
# usage: scripts/gpu-check.sh DATA [NAME]     DATA: a Kvasir-SEG folder (images/ + masks/), NAME: e.g. h200
# environment: LIMIT1, LIMIT2, LIMIT3 (seconds per part), STEPS3 (training steps of part 3), IMAGES (part 3),
#              PROFILE_GPU (paper), PROFILE_FAST (demo), SMOKE=1 (try the script on a CPU with the smoke profile)
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/gpu-check.sh DATA [NAME] (DATA: a folder with images/ and masks/)}
[ -d "$DATA/images" ] && [ -d "$DATA/masks" ] || { echo "$DATA: no images/ and masks/ folders" >&2; exit 2; }
NAME=${2:-$(${PY:-.venv/bin/python} -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)}
DG=${DG:-.venv/bin/diffusegen}   # unquoted below: a prefix such as "taskset -c 1 .venv/bin/diffusegen" works
OUT=figures/bench/gpu-$NAME
RUNS=runs/gpu-check-$NAME
mkdir -p "$OUT" "$RUNS"
LIMIT1=${LIMIT1:-300} LIMIT2=${LIMIT2:-240} LIMIT3=${LIMIT3:-300}
STEPS3=${STEPS3:-3000} IMAGES=${IMAGES:-200}
PROFILE_GPU=${PROFILE_GPU:-paper} PROFILE_FAST=${PROFILE_FAST:-demo}
DEV=(--set device=cuda)
if [ "${SMOKE:-0}" = 1 ]; then   # the same commands on a CPU at the smallest scale: does the script run?
  PROFILE_GPU=smoke PROFILE_FAST=smoke DEV=(--set device=cpu) STEPS3=4 IMAGES=2
fi
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }
part() {  # part LABEL LIMIT COMMAND...: run with a time limit, log to $OUT, note the exit status and seconds
  local label=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$label.log" 2>&1
  local rc=$?
  say "$label: exit $rc in $((SECONDS - t0)) s (limit $limit s; log $OUT/$label.log)"
  return $rc
}
say "gpu-check on $NAME, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# 1. the paper dry run on CUDA, bf16 (the profile's mixed_precision), then compiled if time is left
t1=$SECONDS
part 1-dry-run-bf16 "$LIMIT1" $DG reproduce --profile "$PROFILE_GPU" --dry-run --out "$RUNS/bf16" "${DEV[@]}" --data "$DATA"
cp "$RUNS/bf16/dry-run/figures/$PROFILE_GPU/report.md" "$OUT/dry-run-bf16-report.md" 2>/dev/null && say "  report: $OUT/dry-run-bf16-report.md"
left=$((LIMIT1 - (SECONDS - t1)))
if [ "$left" -gt 60 ]; then
  part 1-dry-run-compile "$left" $DG reproduce --profile "$PROFILE_GPU" --dry-run --out "$RUNS/compile" "${DEV[@]}" \
    --set compile=true --data "$DATA"
  cp "$RUNS/compile/dry-run/figures/$PROFILE_GPU/report.md" "$OUT/dry-run-compile-report.md" 2>/dev/null \
    && say "  report: $OUT/dry-run-compile-report.md"
fi

# 2. the styled pair at the paper's evaluation count: eager, then compiled (summary.md: seconds per styled pair)
t2=$SECONDS
part 2-bench-eager $((LIMIT2 / 2)) $DG bench all --profile "$PROFILE_GPU" --out "$OUT/eager" "${DEV[@]}" \
  && say "  eager: $OUT/eager/summary.md"
part 2-bench-compile $((LIMIT2 - (SECONDS - t2))) $DG bench all --profile "$PROFILE_GPU" --out "$OUT/compile" \
  "${DEV[@]}" --set compile=true && say "  compiled: $OUT/compile/summary.md"

# 3. the fast sampler at scale: data and clustering stages, a full-data model from scratch, then FID of both samplers
FAST=(--profile "$PROFILE_FAST" --out "$RUNS/fast" "${DEV[@]}" --set init_from=none --set "full_train_steps=$STEPS3"
  --set "save_interval=$STEPS3")
t3=$SECONDS
part 3-data 120 $DG reproduce --profile "$PROFILE_FAST" --out "$RUNS/fast" --data "$DATA" --only data clustering \
  "${DEV[@]}"  # the training stage reads the clusters, even for the full model alone
part 3-train $((LIMIT3 * 3 / 5)) $DG train --full "${FAST[@]}"
part 3-fast-sampler $((LIMIT3 - (SECONDS - t3))) $DG bench fast-sampler "${FAST[@]}" --images "$IMAGES"
cp -r "$RUNS/fast/figures/$PROFILE_FAST/fast_sampler" "$OUT/fast-sampler" 2>/dev/null && say "  fast sampler: $OUT/fast-sampler/"
say "done in $SECONDS s"
