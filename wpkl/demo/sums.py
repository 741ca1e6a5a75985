"""The running-sum task with a scratchpad, and teachers whose behaviour after a wrong prefix is chosen by construction.

A sequence is ``BOS a_1 .. a_K =`` (uniform digits) followed by the response ``s_1 .. s_K`` with
``s_k = (s_{k-1} + a_k) mod 10`` and ``s_0 = 0``. The answer is ``s_K``. Each response digit is a running
partial sum, so an early mistake makes every later digit wrong relative to the truth, even when every later
step is computed correctly from the (wrong) digit before it.

Token ids: the digits are 0..9 (so a response's logits are the first 10 columns), BOS is 10 and ``=`` is 11.

Vocabulary of the analysis, per response position k (the student wrote s'_1 .. s'_K):

- the *consistent* digit ``(s'_{k-1} + a_k) mod 10``: the correct step from the student's own prefix;
- a *step error*: ``s'_k`` differs from the consistent digit;
- a *wrong prefix*: some earlier digit ``s'_j`` (j < k) differs from the true ``s_j``;
- the *oracle* mask: 1 where the prefix is not wrong (every token up to and including the first error).

``TeacherWrapper`` (modes ``cons``, ``conf``, ``rec``, and ``trained``) scores a rollout. On a correct prefix
every mode puts 0.99 on the digit the trained teacher predicts (its argmax; the true sum for a trained teacher)
and spreads 0.01 over the other nine. After a wrong prefix: ``cons`` keeps the trained teacher's prediction,
which for a teacher that learned the task is the consistent digit (the null control: supervision after a
mistake is still right about the next step); ``conf`` is uniform over the digits (a teacher lost on an
unfamiliar prefix); ``rec`` puts 0.99 on the true ``s_k`` (a teacher that insists on the truth, which from
the student's own prefix is the wrong step). ``trained`` is the trained teacher's own distribution.
"""

from __future__ import annotations

import math

import torch

DIGITS = 10
BOS = 10
EQUALS = 11
VOCAB = 12
TEACHER_MODES = ("cons", "conf", "rec", "trained")
TARGET_PROBABILITY = 0.99


def prompt_length(k: int) -> int:
    return k + 2  # BOS a_1 .. a_K =


def sample_prompts(batch: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, K + 2]: BOS, K uniform digits, '='."""
    digits = torch.randint(0, DIGITS, (batch, k), generator=generator)
    return torch.cat([torch.full((batch, 1), BOS), digits, torch.full((batch, 1), EQUALS)], dim=1)


def addends(seq: torch.Tensor, k: int) -> torch.Tensor:
    """The digits a_1 .. a_K of [B, >= K + 2] sequences."""
    return seq[:, 1:k + 1]


def true_sums(a: torch.Tensor) -> torch.Tensor:
    """[B, K] running sums s_k = (a_1 + .. + a_k) mod 10."""
    return a.cumsum(dim=1) % DIGITS


def full_sequences(prompts: torch.Tensor, k: int) -> torch.Tensor:
    """Prompts followed by their correct responses: [B, 2K + 2]."""
    return torch.cat([prompts, true_sums(addends(prompts, k))], dim=1)


def response(seq: torch.Tensor, k: int) -> torch.Tensor:
    """The K response digits of [B, 2K + 2] sequences."""
    return seq[:, prompt_length(k):prompt_length(k) + k]


class Analysis:
    """Per-position facts about responses ``s'`` [B, K] to prompts with addends ``a`` [B, K]."""

    def __init__(self, a: torch.Tensor, written: torch.Tensor):
        self.truth = true_sums(a)
        previous = torch.cat([torch.zeros_like(written[:, :1]), written[:, :-1]], dim=1)
        self.consistent = (previous + a) % DIGITS  # the right step from the student's own previous digit
        self.step_error = written != self.consistent
        wrong_digit = written != self.truth
        # wrong_prefix[k]: some digit before position k is wrong.
        self.wrong_prefix = torch.cat([torch.zeros_like(wrong_digit[:, :1]), wrong_digit[:, :-1]], dim=1).cummax(1)[0]
        self.correct = written[:, -1] == self.truth[:, -1]

    @property
    def oracle_mask(self) -> torch.Tensor:
        """1 on tokens whose prefix is still right (up to and including the first wrong digit), else 0."""
        return ~self.wrong_prefix


def analyse(seq: torch.Tensor, k: int) -> Analysis:
    return Analysis(addends(seq, k), response(seq, k))


def smoothed_logits(target: torch.Tensor, probability: float = TARGET_PROBABILITY) -> torch.Tensor:
    """[..., 10] log-probabilities with ``probability`` on ``target`` and the rest spread evenly."""
    other = math.log((1 - probability) / (DIGITS - 1))
    logits = torch.full((*target.shape, DIGITS), other, device=target.device)
    return logits.scatter(-1, target.unsqueeze(-1), math.log(probability))


class TeacherWrapper:
    """Teacher logits over the digits for the K response positions of [B, 2K + 2] rollouts (see the module doc).

    ``trained`` is a model mapping [B, T] tokens to [B, T, V] logits (the trained teacher), or None when the
    truth stands in for its prediction (tests; a perfect teacher).
    """

    def __init__(self, trained, mode: str, k: int):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode must be one of {', '.join(TEACHER_MODES)}; got {mode!r}")
        if mode == "trained" and trained is None:
            raise ValueError("teacher mode 'trained' needs a trained teacher")
        self.trained, self.mode, self.k = trained, mode, k

    @torch.no_grad()
    def trained_logits(self, seq: torch.Tensor) -> torch.Tensor:
        """The trained teacher's digit logits [B, K] for predicting each response digit."""
        p = prompt_length(self.k)
        return self.trained(seq[:, :-1])[:, p - 1:p - 1 + self.k, :DIGITS].float()

    @torch.no_grad()
    def __call__(self, seq: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """([B, K, 10] teacher logits, facts): facts holds the Analysis and the teacher's target digit [B, K]
        (-1 where it has none: ``conf`` after a wrong prefix)."""
        facts = analyse(seq, self.k)
        if self.trained is None:
            predicted = facts.consistent
        else:
            raw = self.trained_logits(seq)
            if self.mode == "trained":
                return raw, dict(analysis=facts, target=raw.argmax(-1))
            predicted = raw.argmax(-1)
        wrong = facts.wrong_prefix
        if self.mode == "rec":
            target = torch.where(wrong, facts.truth, predicted)
        else:
            target = predicted
        logits = smoothed_logits(target)
        if self.mode == "conf":
            logits = torch.where(wrong.unsqueeze(-1), torch.full_like(logits, -math.log(DIGITS)), logits)
            target = torch.where(wrong, torch.full_like(target, -1), target)
        return logits, dict(analysis=facts, target=target)
