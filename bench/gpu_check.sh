#!/usr/bin/env bash
# Pearl's real case on a CUDA GPU and on its host's CPU: 32 Mistral-7B-shaped layers, one
# parent float16 and one bfloat16, `dtype: bfloat16`; SLERP with Pearl's schedule and TIES,
# each merged on the GPU (everything on the device) and on the CPU (mergekit's bits); the
# time, peak host and device memory of each merge, and the GPU's contract with the CPU
# checked on every tensor. Appends the run to bench/gpu_results.json and gpu_results.md,
# and lists the methods that met their targets in pearl_edu/data/gpu_record.json, the
# record that `pearl-edu merge --device auto` reads (it picks the GPU for those alone).
#
#   bench/gpu_check.sh [WORK_DIR]          (default WORK_DIR: bench/out/gpu-check)
#
# The steps are bench/gpu_check.py's (its docstring says what each does); this wrapper
# checks for a GPU before anything is written, builds the compiled kernels for this Python
# when they are missing (the CPU path's times depend on them), and passes the settings on.
# Exits 0 when the contract held, 1 when it did not, 2 when the check cannot run. About
# 5 minutes on an H100-class machine with 16 cores; needs about 60 GB of room: two 14.5 GB
# inputs, and one method's two 14.5 GB outputs at a time (in WORK_DIR, else OUTPUTS_DIR,
# else /dev/shm when it has the room), all deleted at the end unless KEEP=1.
#
# Environment:
#   LAYERS=32        decoder layers of the models (32 is Mistral-7B)
#   METHODS=slerp,ties   the methods to check
#   MAKE_ONLY=1      only write the two models and stop: needs no GPU, so that this step
#                    can be tried on any machine, e.g. MAKE_ONLY=1 LAYERS=2 bench/gpu_check.sh
#   DRY_RUN=1        print what would be done and stop (no GPU needed, nothing written)
#   MODEL_ARGS=...   extra arguments for bench/make_models.py (e.g. smaller --hidden-size)
#   OUTPUTS_DIR=...  the merged models go into OUTPUTS_DIR/gpu-check-outputs, e.g. on
#                    another disk when WORK_DIR's has room for the inputs only
#   KEEP=1           keep WORK_DIR (and the outputs)
#   RECORD=0         append nothing to bench/gpu_results.json and .md
#   PYTHON=...       the Python to run (default: .venv/bin/python, else python3); it needs
#                    torch and pearl_edu's dependencies, and imports pearl_edu from this checkout
#   GPU_DEVICE=cuda  the device of the GPU merges; GPU_DEVICE=cpu runs the whole script
#                    without a GPU (the device backend on the CPU), to test the script itself
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$repo/bench/out/gpu-check}
gpu=${GPU_DEVICE:-cuda}
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || command -v "$python" >/dev/null || python=$(command -v python3)
# pearl_edu from this checkout, whether or not it is installed in that Python.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

say() { printf '%s\n' "gpu_check: $*"; }
die() { printf '%s\n' "gpu_check: error: $*" >&2; exit 2; }

# Fail fast, before writing anything, when there is no GPU to check.
if [ "${MAKE_ONLY:-0}" != 1 ] && [ "${DRY_RUN:-0}" != 1 ] && [[ $gpu == cuda* ]]; then
  if ! command -v nvidia-smi >/dev/null && ! [ -e /dev/nvidia0 ]; then
    die "no NVIDIA GPU here (no nvidia-smi, no /dev/nvidia0); this check needs CUDA. \
To try the model-making step alone: MAKE_ONLY=1 LAYERS=2 $0"
  fi
  if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    die "no CUDA device is visible to torch ($("$python" -c 'import torch; print(torch.__version__)')); \
this check needs an NVIDIA GPU. To try the model-making step alone: MAKE_ONLY=1 LAYERS=2 $0"
  fi
fi
device_for_models=$gpu
[ "${MAKE_ONLY:-0}" = 1 ] && [[ $gpu == cuda* ]] && ! "$python" -c \
  'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' && device_for_models=cpu

# The compiled kernels are built per Python version; on a machine whose Python is not the
# one the package was installed with, build them in place (a C compiler and Python's headers
# are needed; without them the CPU path runs its loops in torch, and says so).
if [ "${MAKE_ONLY:-0}" != 1 ] && [ "${DRY_RUN:-0}" != 1 ] && ! "$python" -c \
  'import sys; from pearl_edu import kernels; sys.exit(0 if kernels.available() else 1)'; then
  include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  if cc -O3 -ffp-contract=off -shared -fPIC -I"$include" "$repo/pearl_edu/_kernels.c" \
    -o "$repo/pearl_edu/_kernels$suffix" -lpthread 2>/dev/null; then
    say "built pearl_edu's compiled kernels for this Python ($suffix)"
  else
    say "could not build pearl_edu's compiled kernels here: the CPU path runs its loops in torch"
  fi
fi

args=("$work" --layers "${LAYERS:-32}" --gpu "$gpu" --methods "${METHODS:-slerp,ties}")
[ "${MAKE_ONLY:-0}" = 1 ] && args+=(--make-only --gpu "$device_for_models")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry-run)
[ "${KEEP:-0}" = 1 ] && args+=(--keep)
[ "${RECORD:-1}" = 0 ] && args+=(--no-record)
[ -n "${OUTPUTS_DIR:-}" ] && args+=(--outputs "$OUTPUTS_DIR")
[ -n "${MODEL_ARGS:-}" ] && args+=("--model-args=$MODEL_ARGS")
[ -n "${RESULTS_JSON:-}" ] && args+=(--results-json "$RESULTS_JSON")
[ -n "${RESULTS_MD:-}" ] && args+=(--results-md "$RESULTS_MD")
exec "$python" "$repo/bench/gpu_check.py" "${args[@]}"
