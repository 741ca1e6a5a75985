"""``wpkl demo``: a small, real on-policy distillation experiment on a synthetic language (no downloads).

language.py   the synthetic language: a hidden Markov model whose hidden mode, fixed by the first tokens,
              governs every later token; exact log-likelihoods by the forward algorithm
model.py      a tiny causal transformer (teacher and student) and its sampler
experiment.py teacher training, student warm start, on-policy distillation runs, evaluation
(the command line, `wpkl demo`, is wpkl/cli/demo.py)
"""
