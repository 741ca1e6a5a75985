#!/bin/bash
# The running-sum grid of docs/experiments.md: 4 teachers x 7 weightings x 10 seeds x 2 drift levels.
# One `wpkl demo` invocation per (drift, seed), so an interrupted grid resumes where it stopped (finished
# invocations are skipped). Run from the repository root with wpkl[demo] installed:
#   bash docs/experiments/run_grid.sh high & bash docs/experiments/run_grid.sh low &   # two streams, ~1.5 h here
# then merge and report:
#   python -m wpkl.demo.sums_report --out runs/grid/report --prefix sums-high- runs/grid/high/seed*/results.json
#   python -m wpkl.demo.sums_report --out runs/grid/report --prefix sums-low- runs/grid/low/seed*/results.json
set -e
drift=$1
for seed in 0 1 2 3 4 5 6 7 8 9; do
  out=runs/grid/$drift/seed$seed
  if [ -f "$out/results.json" ]; then continue; fi
  mkdir -p runs/grid
  nice -n 10 wpkl demo --drift "$drift" --seeds 1 --first-seed "$seed" \
    --teacher cons,conf,rec,trained \
    --weighting uniform,first30,last30,iw_opd_0.5,iw_opd_2,prefix_conf,oracle \
    --no-progress --out "$out.tmp" > "runs/grid/$drift-seed$seed.log" 2>&1
  rm -rf "$out" && mv "$out.tmp" "$out"
done
