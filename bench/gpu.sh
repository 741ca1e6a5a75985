#!/usr/bin/env bash
# One command for one GPU and ten minutes: install wpkl into the machine's Python, then the GPU test suite, the
# kernel resource report, the benchmark (materialized logits, the fused-linear suite, then the vocabulary-parallel
# loss on 2 ranks: bench/sharded.py, and the sequence-parallel loss: bench/sequence.py) and the plots, all
# under one folder. Made for the borrowed H100/H200 machines: no network, a preinstalled torch and triton,
# trl and liger-kernel only from wheels carried in .whl/ (bash ../shared/gpu-wheels.sh fetches them).
#
#   bash bench/gpu.sh [--dry-run] [OUT_DIR]
#
# --dry-run rehearses every step on a CPU machine at tiny sizes, without installing anything.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
budget=${WPKL_GPU_BUDGET:-560}  # seconds for everything: the device tool stops a command at 600
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
say() { echo "$*" | tee -a "$out/summary.txt"; }
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1 TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
: > "$out/summary.txt"

say "== install ($([ $dry = 1 ] && echo 'dry run: nothing installed' || echo 'pip install --no-deps --no-build-isolation -e .'))"
if [ $dry = 0 ]; then
  $py -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
fi
if ls .whl/*.whl > /dev/null 2>&1 && [ $dry = 0 ]; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/wpkl-site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH="/tmp/wpkl-site${PYTHONPATH:+:$PYTHONPATH}"
  say "trl / liger-kernel: installed from .whl/"
else
  say "trl / liger-kernel: not installed (no wheels in .whl/): their providers are reported as skipped"
fi
$py -c "import torch, triton, wpkl; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| wpkl', wpkl.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee "$out/versions.txt" | tee -a "$out/summary.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi: not available" > "$out/nvidia-smi.txt"

say "== GPU test suite ($(left) s left)"
timeout $(( $(left) < 150 ? $(left) : 150 )) $py -m pytest -m gpu -q -rs -p no:cacheprovider \
  --junitxml="$out/gpu-tests.xml" > "$out/gpu-tests.txt" 2>&1
say "gpu tests exit $? ($(tail -1 "$out/gpu-tests.txt"))"

say "== kernel resource report ($(left) s left)"
# The dry run compiles sm_90's large-vocabulary specializations only, with more time: a 2-core CPU compiles
# about one a second (tests/test_aot_compile.py covers both architectures).
report_args=$([ $dry = 1 ] && echo "--quick --arch 90" || echo "")
report_limit=$([ $dry = 1 ] && echo 300 || echo 120)
timeout $(( $(left) < report_limit ? $(left) : report_limit )) $py -m wpkl.tools.kernel_report $report_args \
  --json "$out/kernel-report.json" \
  --sass-dir "$out/sass" > "$out/kernel-report.md" 2> "$out/kernel-report.err"
say "report exit $? ($(tail -1 "$out/kernel-report.md"))"

if [ $dry = 1 ]; then
  logits_args="--device cpu --shapes 64x512:float32 --modes fwd+bwd --providers eager wpkl-torch"
  linear_args="--device cpu --linear-shapes 64x32x512:float32 --linear-providers wpkl eager gemms"
  sharded_args="--device cpu --shapes 64x512:float32 --rep-seconds 0.1"
  sequence_args="--device cpu --shapes 64x512:float32 --rep-seconds 0.1 --cases iw_opd"
else
  logits_args=""
  linear_args=""
  sharded_args="--device cuda"
  sequence_args="--device cuda"
fi
say "== benchmark: materialized logits ($(left) s left)"
$py -m bench --suite logits --out "$out/bench" --no-progress --budget $(( $(left) * 6 / 10 )) $logits_args \
  > "$out/bench-logits.txt" 2>&1
say "bench (logits) exit $?"
say "== benchmark: fused-linear ($(left) s left)"
$py -m bench --suite linear --out "$out/bench-linear" --no-progress --budget $(( $(left) - 130 )) $linear_args \
  > "$out/bench-linear.txt" 2>&1
say "bench (fused-linear) exit $?"
# R = 2 ranks: on a one-GPU machine both share it (gloo; the results say "2 ranks on 1 GPU (shared)"), with a GPU
# per rank each its own (NCCL). Killed at 40 s before the end whatever happens, so the plots still run.
say "== benchmark: sharded, 2 ranks ($(left) s left)"
OMP_NUM_THREADS=1 timeout $(( $(left) - 40 > 10 ? $(left) - 40 : 10 )) $py -m torch.distributed.run --standalone \
  --nproc_per_node 2 bench/sharded.py --out "$out/bench-sharded" --budget $(( $(left) - 90 > 5 ? $(left) - 90 : 5 )) \
  $sharded_args > "$out/bench-sharded.txt" 2>&1
say "bench (sharded) exit $?"
say "== benchmark: sequence-parallel, 2 ranks ($(left) s left)"
OMP_NUM_THREADS=1 timeout $(( $(left) - 30 > 10 ? $(left) - 30 : 10 )) $py -m torch.distributed.run --standalone \
  --nproc_per_node 2 bench/sequence.py --out "$out/bench-sequence" --budget $(( $(left) - 70 > 5 ? $(left) - 70 : 5 )) \
  $sequence_args > "$out/bench-sequence.txt" 2>&1
say "bench (sequence) exit $?"

say "== plots ($(left) s left)"
for results in "$out"/bench/*.json "$out"/bench-linear/*.json; do
  [ -f "$results" ] && $py -m bench --plot "$results" --plot-dir "$out/figures" 2>&1 | tail -3
done
say "done in $(( $(date +%s) - start )) s; everything is under $out"
