"""The vocabulary passes: one pass over a block of tokens' logits gives their per-token terms, and later their
gradient for given per-token coefficients. Two implementations of one contract (triton_pass.py, torch_pass.py),
the specification as a third (torch_pass.reference_terms), the weights kernel, the torch custom ops of the fused
route (ops.py) and the lm_head projection (projection.py). Which one runs: wpkl/engine/route.py."""
