#!/usr/bin/env bash
# Merge two full-size Mistral-7B-shaped models on a CUDA GPU and on the CPU, and check that
# the two outputs agree tensor by tensor.
#
#   bench/gpu_check.sh [WORK_DIR]          (default WORK_DIR: bench/out/gpu-check)
#
# Prints the time of each step, the peak host memory of each merge (GNU time, when
# installed) and the peak GPU memory of the CUDA merge (torch's allocator peak, and the
# device's total from nvidia-smi while it runs). Exits 0 only when the outputs agree.
# Under 8 minutes on an H100 machine; needs about 60 GB of free disk (two 14.5 GB inputs,
# two 14.5 GB outputs), all deleted at the end unless KEEP=1.
#
# Environment:
#   LAYERS=32        decoder layers of the models (32 is Mistral-7B)
#   MAKE_ONLY=1      only write the two models and stop: needs no GPU, so that this step
#                    can be tried on any machine, e.g. MAKE_ONLY=1 LAYERS=2 bench/gpu_check.sh
#   MODEL_ARGS=...   extra arguments for bench/make_models.py (e.g. smaller --hidden-size)
#   ATOL=0           largest difference `pearl-edu verify` accepts between the two outputs
#   KEEP=1           keep WORK_DIR
#   PYTHON=...       the Python with pearl_edu installed (default: .venv/bin/python)
#   GPU_DEVICE=cuda  the device of the first merge; GPU_DEVICE=cpu runs the whole script
#                    without a GPU (two CPU merges), to test the script itself
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$repo/bench/out/gpu-check}
layers=${LAYERS:-32}
gpu=${GPU_DEVICE:-cuda}
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=$(command -v python3)

say() { printf '%s\n' "gpu_check: $*"; }
die() { printf '%s\n' "gpu_check: error: $*" >&2; exit 2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Fail fast, before writing anything, when there is no GPU to check.
if [ "${MAKE_ONLY:-0}" != 1 ] && [[ $gpu == cuda* ]]; then
  if ! command -v nvidia-smi >/dev/null && ! [ -e /dev/nvidia0 ]; then
    die "no NVIDIA GPU here (no nvidia-smi, no /dev/nvidia0); this check needs CUDA. \
To try the model-making step alone: MAKE_ONLY=1 LAYERS=2 $0"
  fi
  if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    die "no CUDA device is visible to torch ($("$python" -c 'import torch; print(torch.__version__)')); \
this check needs an NVIDIA GPU. To try the model-making step alone: MAKE_ONLY=1 LAYERS=2 $0"
  fi
  device_for_models=cuda
else
  device_for_models=cpu
fi

# Each model: embeddings and lm_head (2 x 32000 x 4096) plus 218M parameters per layer, in
# bfloat16; the check holds two inputs and two outputs at once.
needed_gb=$("$python" -c "print(round(4 * 2 * (2 * 32000 * 4096 + $layers * 218_103_808) / 1e9 * 1.05, 1))")
[ "${MAKE_ONLY:-0}" = 1 ] && needed_gb=$("$python" -c "print(round($needed_gb / 2, 1))")
mkdir -p "$work"
free_gb=$("$python" -c "import shutil; print(round(shutil.disk_usage('$work').free / 1e9, 1))")
if "$python" -c "import sys; sys.exit(0 if $free_gb >= $needed_gb else 1)"; then :; else
  die "$work has $free_gb GB free, $needed_gb GB are needed for $layers layers (set LAYERS lower)"
fi
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -rf "$work"; }
trap cleanup EXIT

say "writing two Mistral-7B-shaped models with $layers layers into $work"
t0=$(now)
# shellcheck disable=SC2086  # MODEL_ARGS is a list of arguments
"$python" "$repo/bench/make_models.py" "$work" --layers "$layers" --device "$device_for_models" \
  ${MODEL_ARGS:-} >/dev/null
t_make=$(elapsed "$t0" "$(now)")
say "models written in $t_make s ($(du -sh "$work/model_a" | cut -f1) each)"
if [ "${MAKE_ONLY:-0}" = 1 ]; then
  "$python" -m pearl_edu verify "$work/model_a" "$work/model_a" --quiet >/dev/null \
    || die "model_a cannot be read back"
  say "MAKE_ONLY=1: stopping after the models"
  exit 0
fi

"$python" -c 'import sys; from pearl_edu.recipes import pearl_recipe
print(pearl_recipe(sys.argv[1], sys.argv[2], num_layers=int(sys.argv[3])))' \
  "$work/model_a" "$work/model_b" "$layers" >"$work/slerp.yml"

# merge_on DEVICE NAME: one merge into merged-NAME, timed, with its peak host RSS (GNU
# time) and, on CUDA, torch's peak GPU memory.
merge_on() {
  local device=$1 out=$work/merged-$2 report=$work/time-$2.txt
  local timer=()
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -v -o "$report")
  ${timer[@]+"${timer[@]}"} "$python" - "$work/slerp.yml" "$out" "$device" <<'PY'
import sys
import torch
from pearl_edu.merge import merge

config, out, device = sys.argv[1:]
result = merge(config, out, device=device, progress=False)
peak = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else 0.0
print(f"{result.seconds:.1f} {peak:.2f}")
PY
}

peak_rss_gb() {
  local report=$work/time-$1.txt
  if [ -f "$report" ]; then
    awk -F: '/Maximum resident set size/ { printf "%.2f", $2 / 1e6 }' "$report"
  else
    printf 'n/a (install GNU time: apt-get install time)'
  fi
}

# nvidia-smi's view of the whole device (CUDA context included), sampled every 200 ms.
smi_log=$work/nvidia-smi.csv
smi_pid=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$smi_log" &
  smi_pid=$!
fi

say "merging on $gpu ..."
measured=$(merge_on "$gpu" gpu) || die "the merge on $gpu failed"
read -r t_gpu gpu_peak <<<"$measured"
if [ -n "$smi_pid" ]; then
  kill "$smi_pid" 2>/dev/null || true
  wait "$smi_pid" 2>/dev/null || true
  smi_peak=$(sort -n "$smi_log" | tail -1 | awk '{ printf "%.2f GB", $1 * 1.048576 / 1000 }')
else
  smi_peak="n/a (no nvidia-smi)"
fi
say "merging on cpu ..."
measured=$(merge_on cpu cpu) || die "the merge on cpu failed"
read -r t_cpu _ <<<"$measured"

say "comparing the two outputs ..."
t0=$(now)
status=0
"$python" -m pearl_edu verify "$work/merged-gpu" "$work/merged-cpu" --atol "${ATOL:-0}" --quiet \
  >"$work/verify.txt" || status=$?
t_verify=$(elapsed "$t0" "$(now)")
cat "$work/verify.txt"

cat <<EOF

| step                  | time (s) | peak host RSS (GB) | peak GPU memory        |
|-----------------------|---------:|-------------------:|------------------------|
| make models ($layers layers) | $t_make | | |
| pearl-edu merge, $gpu | $t_gpu | $(peak_rss_gb gpu) | $gpu_peak GB allocated by torch, $smi_peak on the device |
| pearl-edu merge, cpu  | $t_cpu | $(peak_rss_gb cpu) | |
| pearl-edu verify      | $t_verify | | |
EOF
if [ "$status" = 0 ]; then
  say "OK: the $gpu and cpu merges agree"
else
  say "FAILED: the $gpu and cpu merges differ (verify exit status $status)"
fi
exit "$status"
