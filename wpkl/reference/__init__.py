"""The specification: wpkl's math in plain, readable torch, each piece defined once.

This package defines what every backend computes for one token (one row of logits). It materializes
log-softmax over the whole vocabulary, runs in float64 when given float64, and lets autograd do the
gradient, so it is the yardstick the fused kernels are tested against.

With temperature T, s = student / T and u = teacher[..., :V] / T:

    log p = log_softmax(s)  (student)       log q = log_softmax(u)  (teacher, no gradient)

    reverse_kl   D = sum_j p (log p - log q)
    forward_kl   D = sum_j q (log q - log p)
    jsd(beta)    log m = log((1 - beta) p + beta q)
                 D = beta * KL(q || m) + (1 - beta) * KL(p || m)
                 beta = 0 is forward_kl and beta = 1 is reverse_kl exactly (TRL's convention)
    sampled      with y the sampled token and a = log q(y) - log p(y) held constant:
                 L = -a * log p(y) (the on-policy policy-gradient surrogate), D = log p(y) - log q(y) = -a.
                 log q(y) may be given directly (teacher_logprobs, e.g. from a teacher server: no teacher
                 logits needed), and log p(y) in a may come from the policy that sampled y (rollout_logprobs,
                 e.g. vLLM's), as in TRL's IW-OPD trainer. With ``sampled_power`` (PowerOPD) the constant
                 multiplier -a is p(y)^alpha - q(y)^alpha instead (core.py: sampled_multiplier); D is unchanged.

The per-token loss is L = D for every divergence but "sampled". 0 * log 0 = 0 throughout, so -inf
logits (banned tokens) are legal; a token the teacher bans while the student allows it makes the
reverse KL +inf, as the math says. Alongside L and D each token reports the teacher confidence
c = max_j q_j and the entropies of p and q, for weighting and for auditing.

Where each piece lives:

    core.py       the distributions' divergences (kl, entropy, divergence_between), the shared types
    vocab.py      per-row vocabulary sums and maxima, on one device or one rank's vocabulary slice
    terms.py      token_terms: one row of logits against a teacher (logits, log q(y), top-k atoms)
    topk.py       a teacher given as top-k atoms (tail bucket, renormalized, raw)
    weights.py    the per-token weights of a ``wpkl.Weighting``
    reduction.py  the reductions of the weighted per-token losses
"""

from .core import (
    DIVERGENCES,
    TokenTerms,
    TopK,
    TopKOptions,
    compute_dtype,
    divergence_between,
    entropy,
    exact_divergence,
    kl,
    sampled_multiplier,
)
from .reduction import reduce_loss
from .terms import teacher_token_logprob, token_terms
from .topk import TAIL_LOG_MASS_MAX, TOPK_MODES, tail_log_prob, topk_atom_terms, topk_terms
from .vocab import gather_ids, log_probs, owned_values, token_logprob, vocab_logsumexp, vocab_max, vocab_sum
from .weights import (accumulated_factor, compute_weights, entropy_gate, mix_teachers, prefix_confidence_factor,
                      sequence_positions, token_importance_factor)

__all__ = [
    "DIVERGENCES", "TAIL_LOG_MASS_MAX", "TOPK_MODES", "TokenTerms", "TopK", "TopKOptions", "accumulated_factor",
    "compute_dtype", "compute_weights", "divergence_between", "entropy", "entropy_gate", "exact_divergence",
    "gather_ids", "kl", "log_probs", "mix_teachers", "owned_values", "prefix_confidence_factor", "reduce_loss", "sampled_multiplier",
    "sequence_positions", "tail_log_prob", "teacher_token_logprob", "token_importance_factor", "token_logprob",
    "token_terms", "topk_atom_terms", "topk_terms", "vocab_logsumexp", "vocab_max", "vocab_sum",
]
