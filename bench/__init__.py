"""wpkl benchmarks: ``python -m bench --help``.

Times the loss (forward, and forward + backward) for every provider on the same inputs, in one run on one
device, and writes ``bench/results/<device>-<date>.json`` plus a markdown table. ``--plot FILE`` turns a
results file into PNG charts under docs/.
"""
