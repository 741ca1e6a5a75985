"""TRL drop-ins: the same losses as TRL 1.16, computed by wpkl's fused kernels, optionally weighted.

    from wpkl.integrations.trl import use_wpkl
    use_wpkl(trainer, weighting=wpkl.Weighting(accumulated=0.5))   # GKD, IW-OPD or Distillation trainer

Tested against TRL 1.16 (``wpkl[trl]`` pins ``trl>=1.16,<1.17``). What stays TRL's own code:
- ``top_k > 0`` (sparse top-k support with a tail bucket) in ``generalized_jsd_loss``;
- the IW-OPD and Distillation trainers' sparse top-1 paths (``loss_top_k == 1``) and teacher-server JSD paths;
- ``reduction="none"`` of ``generalized_jsd_loss`` (TRL returns per-vocabulary-entry terms, which a fused kernel
  never materializes): TRL computes it, and wpkl's weights, if any, scale each token's row.
The teacher-server IW-OPD path *is* fused: it passes log q(y) only (``teacher_logprobs``), the teacher's logits
are never needed.
"""

from __future__ import annotations

import contextlib
import types
from functools import partial

import torch

from ..api import fused_linear_kl_loss, weighted_kl_loss
from ..engine.chunks import gathered_weights
from ..weighting import Weighting

IGNORE_INDEX = -100


def _import_trl(module: str):
    """Import a TRL module, or say how to install the supported TRL."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.split(".")[0] == "trl":
            raise ImportError('wpkl.integrations.trl needs TRL 1.16: pip install "wpkl[trl]"') from error
        raise


def _divide(total: torch.Tensor, count) -> torch.Tensor:
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def generalized_jsd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    beta=0.5,
    temperature=1.0,
    reduction="batchmean",
    num_items_in_batch=None,
    *,
    top_k=0,
    add_tail=True,
    weighting: Weighting | None = None,
    backend: str = "auto",
):
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (same signature, reductions and ``num_items_in_batch``), fused.

    ``labels == -100`` marks ignored tokens. Reductions, as TRL defines them over the per-entry divergence:
    "batchmean" = sum / valid tokens (sum / batch size without labels), "sum", "mean" = sum / (valid tokens * V),
    "none" = the per-entry tensor (TRL's own code). With ``num_items_in_batch`` the loss is sum / that count.
    ``weighting`` multiplies each token's divergence by its wpkl weight. ``top_k`` and ``add_tail`` are those of
    IWOPDTrainer's version; ``top_k > 0`` runs TRL's own code.
    """
    mask = None if labels is None else labels != IGNORE_INDEX
    if top_k > 0 or reduction == "none":
        IWOPDTrainer = _import_trl("trl.experimental.iw_opd.iw_opd_trainer").IWOPDTrainer
        if top_k > 0 and weighting is not None:
            raise ValueError("weighting is not supported with top_k > 0 (TRL's own sparse top-k path)")
        out = IWOPDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                                temperature=temperature, reduction=reduction, top_k=top_k,
                                                add_tail=add_tail, num_items_in_batch=num_items_in_batch)
        if reduction != "none" or weighting is None:
            return out
        _, stats = weighted_kl_loss(student_logits.detach(), teacher_logits, mask=mask, weighting=weighting,
                                    divergence="jsd", beta=beta, temperature=temperature, return_stats=True,
                                    backend=backend)
        weights = stats.weight if mask is None else stats.weight[mask]
        return out * weights.unsqueeze(-1).to(out.dtype)

    total = weighted_kl_loss(student_logits, teacher_logits, mask=mask, weighting=weighting, divergence="jsd",
                             beta=beta, temperature=temperature, reduction="sum", backend=backend)
    if num_items_in_batch is not None:
        return _divide(total, num_items_in_batch)
    if reduction == "sum":
        return total
    tokens = mask.sum() if mask is not None else student_logits[..., 0].numel()
    if reduction == "batchmean":
        # TRL divides by the valid-token count, or, without labels, by the size of the first dimension.
        return total / (mask.sum().clamp_min(1) if mask is not None else max(student_logits.size(0), 1))
    if reduction == "mean":
        return total / (tokens * student_logits.size(-1))
    raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")


def iw_opd_loss(
    student_logits,
    completion_tokens,
    labels,
    teacher_actual_logprobs,
    rollout_logprobs=None,
    num_items_in_batch=None,
    *,
    temperature: float = 1.0,
    gamma: float = 0.5,
    epsilon: float = 1e-8,
    weighting: Weighting | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    sampled_power: float | None = None,
):
    """TRL's ``IWOPDTrainer._compute_iw_opd_loss`` (sampled-token IW-OPD), fused over the student's vocabulary.

    Loss = sum_i -log p(y_i) * w_i * a_i / (valid tokens or ``num_items_in_batch``) with
    a_i = log q(y_i) - log p_rollout(y_i) and w_i = 1 + gamma * (1 - prefix share of the sequence's |a|).
    ``weighting`` replaces TRL's weights by any wpkl weighting (default: ``Weighting(accumulated=gamma,
    normalize=False, accumulated_eps=epsilon)``, which is TRL's). ``sampled_power``: PowerOPD's alpha (the
    advantage becomes q(y)^alpha - p_rollout(y)^alpha; the weights still see |a|, the log-ratio).
    """
    weighting = weighting or Weighting(accumulated=gamma, normalize=False, accumulated_eps=epsilon)
    return weighted_kl_loss(
        student_logits, None, mask=labels != IGNORE_INDEX, tokens=completion_tokens, divergence="sampled",
        weighting=weighting, temperature=temperature, backend=backend, return_stats=return_stats,
        num_items_in_batch=num_items_in_batch, teacher_logprobs=teacher_actual_logprobs,
        rollout_logprobs=rollout_logprobs, sampled_power=sampled_power,
    )


def _iw_opd_method(weighting, backend, sampled_power=None):
    """A replacement for ``IWOPDTrainer._compute_iw_opd_loss`` that also logs TRL's iw_opd/* metrics."""

    def _compute_iw_opd_loss(self, student_logits, completion_tokens, labels, teacher_actual_logprobs,
                             rollout_logprobs=None, num_items_in_batch=None):
        loss, stats = iw_opd_loss(student_logits, completion_tokens, labels, teacher_actual_logprobs,
                                  rollout_logprobs, num_items_in_batch, temperature=self.temperature,
                                  gamma=self.iw_opd_gamma, epsilon=self.iw_opd_epsilon, weighting=weighting,
                                  backend=backend, return_stats=True, sampled_power=sampled_power)
        with torch.no_grad():
            # TRL's iw_opd/* metrics, read back with one host sync (TRL itself makes six). With sampled_power the
            # advantage metrics stay the log-ratio's (what the weights see).
            valid = stats.mask
            count = valid.sum()
            n = count.clamp_min(1)
            advantage = -stats.divergence  # a = log q(y) - log p(y); 0 on masked tokens, as is the weight
            weight = stats.weight
            values = torch.stack([
                count.float(), (weight * advantage).sum() / n, advantage.abs().sum() / n, weight.sum() / n,
                torch.where(valid, weight, torch.inf).min(), torch.where(valid, weight, -torch.inf).max(),
            ]).tolist()
            if values[0] > 0:
                mode = "train" if self.model.training else "eval"
                names = ("mean_advantage", "mean_abs_advantage", "mean_weight", "min_weight", "max_weight")
                for name, value in zip(names, values[1:], strict=True):
                    self._metrics[mode][f"iw_opd/{name}"].append(value)
        return loss

    return _compute_iw_opd_loss


def _distillation_divergence(weighting, backend):
    """A replacement for ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (same signature and returns:
    the loss, the sum of the student's per-token entropy, the valid count), through ``fused_linear_kl_loss``: the
    logits are projected chunk by chunk and never materialized, as in TRL, and the tokens can be weighted.

    Precision is TRL's (wpkl/backends/projection.py). Under DeepSpeed ZeRO-3 the lm_head parameters are gathered with
    TRL's own ``maybe_gather_lm_head_ctx`` for the call, and again when the two-phase schedule recomputes the
    projections in backward (the eager schedule computes its gradients inside the forward's gather, as Liger's
    fused losses do).
    """

    def _chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                                 teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                                 student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                                 teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                                 teacher_final_logit_softcapping=None, temperature=1.0):
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        @contextlib.contextmanager
        def gathered():  # re-entered by the two-phase schedule's backward (wpkl/engine/linear.py)
            with maybe_gather_lm_head_ctx(student_lm_head_weight, student_lm_head_bias), \
                    maybe_gather_lm_head_ctx(teacher_lm_head_weight, teacher_lm_head_bias):
                yield

        mask = completion_mask != 0
        with gathered_weights(gathered):
            total, stats = fused_linear_kl_loss(
                student_hidden_states, student_lm_head_weight, teacher_hidden_states.detach(),
                teacher_lm_head_weight.detach(), mask=mask, weighting=weighting, divergence="jsd", beta=beta,
                temperature=temperature, reduction="sum", return_stats=True, backend=backend,
                student_bias=student_lm_head_bias,
                teacher_bias=None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach(),
                student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping)
        n_valid = mask.sum()
        loss = total / n_valid.clamp(min=1) if num_items_in_batch is None else _divide(total, num_items_in_batch)
        return loss, stats.student_entropy.sum(), n_valid

    return _chunked_divergence_loss


@contextlib.contextmanager
def _swapped(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def use_wpkl(trainer, weighting: Weighting | None = None, backend: str = "auto", sampled_power: float | None = None):
    """Make a TRL trainer compute its distillation loss with wpkl (in place; returns the trainer).

    - ``GKDTrainer``: ``generalized_jsd_loss`` (the full-vocabulary JSD / KL).
    - ``IWOPDTrainer``: ``generalized_jsd_loss`` and the sampled-token IW-OPD loss; ``weighting`` (if given)
      replaces TRL's IW-OPD weights in the latter, and ``sampled_power`` (PowerOPD's alpha) its advantage.
    - ``DistillationTrainer``: its fused-linear divergence (``_chunked_divergence_loss``), through
      ``fused_linear_kl_loss``: never materialized logits, as in TRL.
    Paths listed in this module's docstring stay TRL's.
    """
    if weighting is not None and not isinstance(weighting, Weighting):
        raise TypeError(f"weighting must be a wpkl.Weighting or None, got {type(weighting).__name__}")
    if sampled_power is not None:  # checked before anything is patched
        from ..spec import LossSpec

        LossSpec(divergence="sampled", sampled_power=sampled_power)
        if not callable(getattr(type(trainer), "_compute_iw_opd_loss", None)):
            raise ValueError("sampled_power (PowerOPD) applies to the IW-OPD trainer's sampled-token loss; "
                             f"{type(trainer).__name__} has none")
    distillation_trainer = _import_trl("trl.trainer.distillation_trainer")

    patched = False
    if isinstance(trainer, distillation_trainer.DistillationTrainer):
        # Wrap TRL's own `_compute_loss`, never an earlier use_wpkl wrapper: nested wrappers would swap the module
        # function in turn and the innermost (the first use_wpkl's weighting) would win.
        original = trainer.__dict__.get("_wpkl_original_compute_loss", trainer._compute_loss)
        trainer._wpkl_original_compute_loss = original
        replacement = _distillation_divergence(weighting, backend)

        def _compute_loss(*args, **kwargs):
            with _swapped(distillation_trainer, "_chunked_divergence_loss", replacement):
                return original(*args, **kwargs)

        trainer._compute_loss = _compute_loss
        patched = True
    if callable(getattr(type(trainer), "generalized_jsd_loss", None)):
        trainer.generalized_jsd_loss = partial(generalized_jsd_loss, weighting=weighting, backend=backend)
        patched = True
    if callable(getattr(type(trainer), "_compute_iw_opd_loss", None)):
        trainer._compute_iw_opd_loss = types.MethodType(_iw_opd_method(weighting, backend, sampled_power), trainer)
        patched = True

    if not patched:
        raise TypeError(f"use_wpkl does not know {type(trainer).__name__}: expected a TRL GKD, IW-OPD or "
                        "Distillation trainer")
    trainer.wpkl_weighting = weighting
    return trainer
