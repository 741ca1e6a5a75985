#!/usr/bin/env bash
# One command for a person with one GPU for ten minutes: the GPU test suite, the kernel resource report,
# and the default benchmark, everything under one output folder.
#   bash bench/gpu.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1

nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$out/versions.txt"

echo "== GPU test suite" | tee "$out/summary.txt"
timeout 240 python -m pytest -m gpu -q -rs --junitxml="$out/gpu-tests.xml" 2>&1 | tee "$out/gpu-tests.txt" | tail -3
echo "gpu tests exit: ${PIPESTATUS[0]}" | tee -a "$out/summary.txt"

echo "== kernel resource report" | tee -a "$out/summary.txt"
python -m wpkl.kernels.report --json "$out/kernel-report.json" --sass-dir "$out/sass" > "$out/kernel-report.md" 2>/dev/null
tail -1 "$out/kernel-report.md" | tee -a "$out/summary.txt"

echo "== default benchmark" | tee -a "$out/summary.txt"
python -m bench --out "$out/bench" --budget 330 2>&1 | tee "$out/bench.txt" | tail -3
for results in "$out"/bench/*.json; do
  python -m bench --plot "$results" --plot-dir "$out/figures" 2>&1 | tail -5
done
echo "everything is under $out" | tee -a "$out/summary.txt"
