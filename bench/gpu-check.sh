#!/usr/bin/env bash
# The one prepared check of the CUDA path, for the times a GPU is lent (tests never need one):
# builds the release binaries, serves both vision models and the language model on CUDA, and
# prints throughput and p50/p99 at 1 and 32 streams against the raw CUDA ceiling measured in
# the same run (`marquee-bench gpu-check`). Paste the table into bench/RESULTS.md, or pass
# `--out bench/RESULTS.md` to replace its section.
#
#   bench/gpu-check.sh [--out FILE]          on `cuda` (MARQUEE_GPU_DEVICE=cuda:N for another)
#   bench/gpu-check.sh --dry-run [--out F]   the same steps on the CPU with small counts and the
#                                            binaries in MARQUEE_BIN_DIR (default target/debug):
#                                            what `make test` runs, so the script stays runnable
#
# Needs `make setup` first (the venv with libtorch, the model repository, h2load).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${MARQUEE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/marquee}"
export PATH="$cache/venv/bin:$HOME/.cargo/bin:$PATH"

dry_run=0
out=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out=(--out "$2"); shift ;;
    *) echo "gpu-check: unknown argument \`$1\` (use --dry-run, --out FILE)" >&2; exit 64 ;;
  esac
  shift
done

repo="${MARQUEE_MODEL_REPO:-$PWD/model-repository}"
for model in fashion_cnn efficientnet_lite0 gpt_reviews; do
  [[ -f "$repo/$model/model.toml" ]] || { echo "gpu-check: \`$repo/$model\` is missing (run make setup)" >&2; exit 66; }
done
command -v h2load >/dev/null || { echo "gpu-check: h2load is missing (Debian nghttp2-client; make setup installs it)" >&2; exit 69; }

if ((dry_run)); then
  device=cpu
  bin="${MARQUEE_BIN_DIR:-$PWD/target/debug}"
  counts=(--calls 64 --seconds 0.5 --runs 1)
else
  device="${MARQUEE_GPU_DEVICE:-cuda}"
  # Refuse here, with the reason, rather than after a release build.
  if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA device is visible (torch.cuda.is_available() is False); bench/gpu-check.sh --dry-run checks the steps on the CPU" >&2
    exit 69
  fi
  cargo build --release -p marquee-vision -p marquee-language -p marquee-bench
  bin="$PWD/target/release"
  counts=(--calls 20000 --seconds 5 --runs 3)
fi

exec "$bin/marquee-bench" gpu-check --device "$device" --repo "$repo" --bin-dir "$bin" "${counts[@]}" "${out[@]}"
