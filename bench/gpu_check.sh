#!/usr/bin/env bash
# Merge two full-size Mistral-7B-shaped models on a CUDA GPU and on the CPU, and check that
# the two outputs agree tensor by tensor.
#
#   bench/gpu_check.sh [WORK_DIR]          (default WORK_DIR: bench/out/gpu-check)
#
# Prints the time of each step, the peak host memory of each merge (the merging process's
# peak resident set) and the peak GPU memory of the CUDA merge (torch's allocator peak, and
# the device's total from nvidia-smi while it runs). The outputs must be identical (SLERP's
# cosine is summed on the CPU on both paths), or within ATOL or MAX_ULP when these are set.
# Exits 0 only when they agree. About 3.5 minutes on an H100 machine (measured); needs
# about 60 GB of free disk (two 14.5 GB inputs, two 14.5 GB outputs), all deleted at the
# end unless KEEP=1.
#
# Environment:
#   LAYERS=32        decoder layers of the models (32 is Mistral-7B)
#   MAKE_ONLY=1      only write the two models and stop: needs no GPU, so that this step
#                    can be tried on any machine, e.g. MAKE_ONLY=1 LAYERS=2 bench/gpu_check.sh
#   MODEL_ARGS=...   extra arguments for bench/make_models.py (e.g. smaller --hidden-size)
#   OUTPUTS_DIR=...  the two merged models go into OUTPUTS_DIR/gpu-check-outputs instead of
#                    WORK_DIR, e.g. on another disk when WORK_DIR's has room for the inputs only
#   ATOL=0           largest absolute difference `pearl-edu verify` accepts
#   MAX_ULP=0        largest difference in units in the last place it accepts
#   KEEP=1           keep WORK_DIR (and OUTPUTS_DIR)
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
pair_gb=$("$python" -c "print(round(2 * 2 * (2 * 32000 * 4096 + $layers * 218_103_808) / 1e9 * 1.05, 1))")
outputs=$work
[ -n "${OUTPUTS_DIR:-}" ] && outputs=$OUTPUTS_DIR/gpu-check-outputs
mkdir -p "$work"
[ "${MAKE_ONLY:-0}" = 1 ] || mkdir -p "$outputs"
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -rf "$work" "$outputs"; }
trap cleanup EXIT
# check_room DIR GB: refuse to start when DIR's file system has less than GB free.
check_room() {
  local free_gb
  free_gb=$("$python" -c "import shutil, sys; print(round(shutil.disk_usage(sys.argv[1]).free / 1e9, 1))" "$1")
  "$python" -c "import sys; sys.exit(0 if $free_gb >= $2 else 1)" || die "$1 has $free_gb GB free, \
$2 GB are needed for $layers layers (set LAYERS lower, or OUTPUTS_DIR to another disk)"
}
if [ "${MAKE_ONLY:-0}" = 1 ]; then
  check_room "$work" "$pair_gb"
elif [ "$(stat -c %d "$work")" = "$(stat -c %d "$outputs")" ]; then
  check_room "$work" "$("$python" -c "print(2 * $pair_gb)")"
else
  check_room "$work" "$pair_gb"
  check_room "$outputs" "$pair_gb"
fi

say "$("$python" -c 'import os, torch
from pearl_edu import kernels
state = "loaded" if kernels.available() else "not built (torch loops)"
print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads,",
      f"{os.cpu_count()} cores; compiled kernels: {state}")')"
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

# merge_on DEVICE NAME: one merge into merged-NAME; prints its time in seconds, the process's
# peak resident memory in GB and, on CUDA, torch's peak GPU memory in GB.
merge_on() {
  "$python" - "$work/slerp.yml" "$outputs/merged-$2" "$1" <<'PY'
import resource
import sys

import torch

from pearl_edu.merge import merge

config, out, device = sys.argv[1:]
result = merge(config, out, device=device, progress=False)
gpu_peak = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else 0.0
host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
print(f"{result.seconds:.1f} {host_peak:.2f} {gpu_peak:.2f}")
PY
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
read -r t_gpu rss_gpu gpu_peak <<<"$measured"
if [ -n "$smi_pid" ]; then
  kill "$smi_pid" 2>/dev/null || true
  wait "$smi_pid" 2>/dev/null || true
  smi_peak=$(sort -n "$smi_log" | tail -1 | awk '{ printf "%.2f GB", $1 * 1.048576 / 1000 }')
else
  smi_peak="n/a (no nvidia-smi)"
fi
say "merging on cpu ..."
measured=$(merge_on cpu cpu) || die "the merge on cpu failed"
read -r t_cpu rss_cpu _ <<<"$measured"

say "comparing the two outputs ..."
t0=$(now)
status=0
"$python" -m pearl_edu verify "$outputs/merged-gpu" "$outputs/merged-cpu" --quiet \
  --atol "${ATOL:-0}" --max-ulp "${MAX_ULP:-0}" >"$work/verify.txt" || status=$?
t_verify=$(elapsed "$t0" "$(now)")
cat "$work/verify.txt"

cat <<EOF

| step                  | time (s) | peak host RSS (GB) | peak GPU memory        |
|-----------------------|---------:|-------------------:|------------------------|
| make models ($layers layers) | $t_make | | |
| pearl-edu merge, $gpu | $t_gpu | $rss_gpu | $gpu_peak GB allocated by torch, $smi_peak on the device |
| pearl-edu merge, cpu  | $t_cpu | $rss_cpu | |
| pearl-edu verify      | $t_verify | | |
EOF
if [ "$status" = 0 ]; then
  say "OK: the $gpu and cpu merges agree"
else
  say "FAILED: the $gpu and cpu merges differ (verify exit status $status)"
fi
exit "$status"
