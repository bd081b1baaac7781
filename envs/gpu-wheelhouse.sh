#!/usr/bin/env bash
# On a machine with a package index: the wheels a GPU node without one lacks for the engine
# (`python -m barkbench run|fidelity|aggregate`), `pytest tests/test_cuda.py` and scripts/gpu-reference,
# when the node already has the CUDA stack (torch, transformers, accelerate, pandas, seaborn, scipy, pytest):
# jsonschema with its dependencies (rpds-py is compiled per Python version: downloaded for the node's),
# nvidia-ml-py (GPU energy counter) and barkbench itself. Snakemake stays on the connected machine.
#
#   envs/gpu-wheelhouse.sh --python-version 3.12 [--platform manylinux_2_28_x86_64] [--out wheels]
#
# On the node: pip install --no-index --find-links wheels -r wheels/requirements.txt
#              pip install --no-index --no-deps wheels/barkbench-*.whl
set -euo pipefail
cd "$(dirname "$0")/.."

python_version="" out="wheels" platforms=() limit_mib=64
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) python_version="$2"; shift 2 ;;
    --platform) platforms+=(--platform "$2"); shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "gpu-wheelhouse: unknown argument '$1' (--python-version X.Y [--platform TAG] [--out DIR])" >&2; exit 2 ;;
  esac
done
[ -n "$python_version" ] || { echo "gpu-wheelhouse: --python-version X.Y (the node's Python) is required" >&2; exit 2; }
python=${PYTHON:-python3}

# Exact pins from envs/: the version every result records.
pin() { grep -E "^$1==" "$2" | sed 's/[[:space:]]*#.*//' ; }
jsonschema_pin=$(pin jsonschema envs/requirements.txt)
nvml_pin=$(pin nvidia-ml-py envs/requirements-cuda.txt)
[ -n "$jsonschema_pin" ] && [ -n "$nvml_pin" ] || { echo "gpu-wheelhouse: pins missing in envs/" >&2; exit 1; }

mkdir -p "$out"
rm -f "$out"/*.whl
"$python" -m pip download --quiet --dest "$out" --only-binary=:all: --python-version "$python_version" \
    "${platforms[@]}" "$jsonschema_pin" "$nvml_pin"
had_build=$([ -e build ] && echo yes || echo no)
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" .
[ "$had_build" = yes ] || rm -rf build  # setuptools' build folder in the checkout, made just now
# What the node installs from the folder: the pins with their dependencies; then barkbench's wheel with
# --no-deps (its other dependencies are the node's stack; snakemake and pypandoc-binary serve the workflow
# and the renderer, not the engine).
printf '%s\n%s\n' "$jsonschema_pin" "$nvml_pin" > "$out/requirements.txt"

size=$(du -sb "$out" | cut -f1)
echo "gpu-wheelhouse: $(ls "$out"/*.whl | wc -l) wheels, $((size / 1024)) KiB in $out (Python $python_version)"
if [ "$size" -gt $((limit_mib * 1024 * 1024)) ]; then
  echo "gpu-wheelhouse: $out is over $limit_mib MiB" >&2
  exit 1
fi
