"""verl drop-in: wpkl's fused top-k loss and its weighting inside verl's distillation trainer (verl 0.9.1).

    # in a module every verl worker imports (e.g. actor_rollout_ref.model.external_lib=my_setup)
    import wpkl
    from wpkl.integrations.verl import use_wpkl
    use_wpkl(topk_mode="tail", divergence="forward_kl", weighting=wpkl.Weighting(accumulated=0.5))

and ``distillation.distillation_loss.loss_mode=wpkl_forward_kl_topk`` (or ``wpkl_k3``, ``wpkl_kl``, ...).

Two things change, both undone by ``undo()``:

1. The logits processor. verl computes the per-token top-k loss on each rank's local logits in
   ``verl.trainer.distillation.{fsdp,megatron}.losses.compute_forward_kl_topk`` (FSDP/FSDP2/VeOmni: logits
   ``(1, nnz / sp, V)``, teacher data sliced like them for Ulysses; Megatron: ``(.., V / tp)``, teacher data cut
   for context parallelism). ``use_wpkl`` replaces both with wpkl's top-k loss (``wpkl.weighted_kl_loss`` with
   ``teacher_topk_ids``: no [tokens, V] log-softmax; Megatron's vocabulary shards through ``process_group=``
   = Megatron's tensor-parallel group), returning verl's dict with verl's shapes: ``distillation_losses``
   (differentiable), ``student_mass``, ``teacher_mass``, ``overlap_count``, ``overlap_token_advantage`` (no
   gradient; computed under ``no_grad`` in chunks of at most ``DIAGNOSTIC_CHUNK_BYTES`` of float32 logits).
   ``topk_mode="verl"`` reproduces verl's own ``compute_forward_kl_topk`` (forward KL over the atoms as given,
   both sides clamped at ``log_prob_min_clamp``); ``"tail"`` and ``"renormalize"`` are wpkl's top-k modes (a
   tail bucket, whose forward KL is never negative; or both sides renormalized), with ``divergence`` forward
   KL, reverse KL or jsd (``beta``).
2. The loss modes ``wpkl_forward_kl_topk`` (top-k) and ``wpkl_<estimator>`` for each of verl's sampled-token
   estimators (``kl``, ``k1``, ``abs``, ``mse``, ``k2``, ``low_var_kl``, ``k3``): verl's own per-token losses,
   times wpkl's weights (``weighting``; None: exactly verl's result). verl then clamps (``loss_max_clamp``, on
   the weighted loss, verl's order), aggregates (every ``loss_agg_mode``) or uses them as advantages
   (``use_policy_gradient``) unchanged. The weights see the response tokens of the micro-batch, laid out
   (bsz, response_length): D_i is the token's top-k divergence (top-k modes) or |log q(y) - log p(y)|
   (estimators, the IW-OPD authors' discrepancy), the confidence max_j q_j of the teacher's top-k
   (top-k only), and prefix confidence the teacher's log q(y) (estimators only). Their statistics go into
   verl's metrics (``distillation/wpkl_weight_mean``, ``_min``, ``_max``). TIP's ``token_importance`` reads the
   student's entropy from verl's model output (``actor_rollout_ref.actor.calculate_entropy=True``).
3. The loss mode ``wpkl_power``: PowerOPD's advantage (arXiv 2606.17199), the per-token "loss"
   p(y)^alpha - q(y)^alpha (``sampled_power``, 5 by default as its authors use) whose negative verl's
   policy-gradient form (``use_policy_gradient=True``, which it needs) takes as the advantage, weighted as the
   estimators are.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..api import weighted_kl_loss
from ..reference import compute_weights
from ..weighting import Weighting

ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
TOPK_NAME = "wpkl_forward_kl_topk"
POWER_NAME = "wpkl_power"
DIAGNOSTIC_CHUNK_BYTES = 64 << 20
_MODULES = {"fsdp": "verl.trainer.distillation.fsdp.losses", "megatron": "verl.trainer.distillation.megatron.losses"}


@dataclass(frozen=True)
class VerlOptions:
    topk_mode: str = "verl"
    divergence: str = "forward_kl"
    beta: float = 0.5
    weighting: Weighting | None = None
    backend: str = "auto"
    sampled_power: float = 5.0  # PowerOPD's alpha (the wpkl_power loss mode)

    def __post_init__(self):
        if self.topk_mode not in ("verl", "tail", "renormalize"):
            raise ValueError(f'topk_mode must be "verl", "tail" or "renormalize", got {self.topk_mode!r}')
        if self.topk_mode == "verl" and self.divergence != "forward_kl":
            raise ValueError('topk_mode="verl" is verl\'s top-k forward KL: divergence must be "forward_kl"')
        if self.weighting is not None and not isinstance(self.weighting, Weighting):
            raise TypeError(f"weighting must be a wpkl.Weighting or None, got {type(self.weighting).__name__}")
        power = self.sampled_power
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power < float("inf"):
            raise ValueError(f"sampled_power must be a finite number > 0 (PowerOPD's alpha), got {power!r}")


_state: dict = {"options": None, "patched": {}, "registered": []}


def _verl(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.split(".")[0] == "verl":
            raise ImportError('wpkl.integrations.verl needs verl 0.9.1: pip install "wpkl[verl]"') from error
        raise


def options() -> VerlOptions | None:
    """The options of the active ``use_wpkl`` (None: not in use)."""
    return _state["options"]


# ------------------------------------------------------------------------------------------- the logits processor

def topk_outputs(student_logits, teacher_ids, teacher_logprobs, loss_config, opts: VerlOptions, process_group=None,
                 masses_clamped=False):
    """verl's logits-processor dict for local logits [B, T, V_local] and the teacher's top-k [B, T, K].
    ``masses_clamped``: student_mass and teacher_mass from the clamped log-probs (verl's Megatron function does
    so; its FSDP function sums the unclamped ones)."""
    floor = loss_config.log_prob_min_clamp
    raw = opts.topk_mode == "verl"
    # verl pads the teacher's rows (Ulysses' slice to a multiple of sp, Megatron's THD alignment) with zeros: ids
    # 0 and log-probs 0. Those rows are dropped after the processor; here they are masked (loss 0, no gradient)
    # instead of read as a top-k list that repeats id 0.
    padding = (teacher_ids == 0).all(-1) & (teacher_logprobs == 0).all(-1)
    losses = weighted_kl_loss(student_logits, None, teacher_topk_ids=teacher_ids, teacher_topk_logprobs=teacher_logprobs,
                              mask=~padding, divergence=opts.divergence, beta=opts.beta, reduction="none",
                              backend=opts.backend,
                              topk_mode="raw" if raw else opts.topk_mode,
                              topk_logprob_floor=floor if raw else None, process_group=process_group)
    with torch.no_grad():
        out = _diagnostics(student_logits.detach(), teacher_ids, teacher_logprobs, floor, process_group,
                           masses_clamped)
    return {"distillation_losses": losses, **out}


def _diagnostics(logits, ids, teacher_lp, floor, group, masses_clamped=False):
    """student_mass, teacher_mass, overlap_count, overlap_token_advantage as verl defines them (verl's
    fsdp/losses.py), from the student's log-probs at the teacher's ids and its own top-k ids: chunks of rows,
    float32, no [tokens, V] buffer; with a vocabulary group, the shards' maxima, sums and top-k merged."""
    from ..parallel.vocab import VocabShard

    B, T, V = logits.shape
    K = ids.shape[-1]
    flat, flat_ids = logits.reshape(-1, V), ids.reshape(-1, K).long()
    n = flat.shape[0]
    shard = None if group is None else VocabShard(group, V)
    start = 0 if shard is None else shard.offset
    student_lp = torch.empty(n, K, dtype=torch.float32, device=logits.device)
    student_top = torch.empty(n, K, dtype=torch.long, device=logits.device)
    rows = max(1, DIAGNOSTIC_CHUNK_BYTES // max(1, 4 * V))
    for s in range(0, n, rows):
        x = flat[s:s + rows].float()
        local = flat_ids[s:s + rows] - start
        mine = (local >= 0) & (local < V)
        m = x.amax(-1, keepdim=True)
        if shard is not None:
            m = shard.max(m)
        z = (x - m).exp().sum(-1, keepdim=True)
        if shard is not None:
            z = shard.sum_(z)
        lse = m + z.log()
        at = torch.where(mine, x.gather(-1, local.clamp(0, V - 1)), 0.0)
        if shard is not None:
            at = shard.sum_(at)
        student_lp[s:s + rows] = at - lse
        k = min(K, V)
        vals, top = x.topk(k, dim=-1)
        if group is not None:
            vals, top = _merge_topk(vals, top + start, K, group)
        student_top[s:s + rows] = top if top.shape[-1] == K else torch.nn.functional.pad(top, (0, K - top.shape[-1]),
                                                                                           value=-1)
    student_lp = student_lp.reshape(B, T, K)
    student_top = student_top.reshape(B, T, K)
    teacher_lp = teacher_lp.float()
    if floor is not None and masses_clamped:
        student_lp, teacher_lp = student_lp.clamp_min(floor), teacher_lp.clamp_min(floor)
    student_mass = student_lp.exp().sum(-1)
    teacher_mass = teacher_lp.exp().sum(-1)
    if floor is not None:
        student_lp, teacher_lp = student_lp.clamp_min(floor), teacher_lp.clamp_min(floor)
    overlap = (ids.unsqueeze(-1) == student_top.unsqueeze(-2)).any(-1)
    count = overlap.sum(-1)
    token_kl = teacher_lp.exp() * (teacher_lp - student_lp)
    advantage = torch.where(count > 0, (-token_kl * overlap).sum(-1) / count.clamp_min(1), 0.0)
    return {"student_mass": student_mass, "teacher_mass": teacher_mass, "overlap_count": count,
            "overlap_token_advantage": advantage}


def _merge_topk(vals, ids, K, group):
    """The global top-K of the shards' local top-k (ids global), as Megatron's verl loss does."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    all_vals = [torch.empty_like(vals) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_vals, vals.contiguous(), group=group)
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    vals, ids = torch.cat(all_vals, -1), torch.cat(all_ids, -1)
    best = vals.topk(min(K, vals.shape[-1]), dim=-1).indices
    return vals.gather(-1, best), ids.gather(-1, best)


def _fsdp_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format):
    """``verl.trainer.distillation.fsdp.losses.compute_forward_kl_topk``, by wpkl (module docstring)."""
    verl_fsdp = _verl(_MODULES["fsdp"])
    assert teacher_topk_log_probs.is_nested and teacher_topk_ids.is_nested
    lq = teacher_topk_log_probs.values().unsqueeze(0)
    ids = teacher_topk_ids.values().unsqueeze(0)
    if verl_fsdp.get_ulysses_sequence_parallel_world_size() > 1:  # verl's own slicing, as its function does
        lq = verl_fsdp.slice_input_tensor(lq, dim=1)
        ids = verl_fsdp.slice_input_tensor(ids, dim=1)
    assert lq.shape[:2] == ids.shape[:2] == student_logits.shape[:2]
    return topk_outputs(student_logits, ids, lq, config.distillation_loss, _state["options"])


def _megatron_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format):
    """``verl.trainer.distillation.megatron.losses.compute_forward_kl_topk``, by wpkl: vocabulary-parallel logits
    (Megatron's tensor-parallel group), the teacher's data cut for context parallelism by verl's own helpers."""
    verl_megatron = _verl(_MODULES["megatron"])
    from megatron.core.parallel_state import get_tensor_model_parallel_group, get_tensor_model_parallel_world_size

    cut = verl_megatron.preprocess_thd_engine if data_format == "thd" else verl_megatron.preprocess_bshd_engine
    lq, *_ = cut(teacher_topk_log_probs, pre_process=True)
    ids, *_ = cut(teacher_topk_ids, pre_process=True)
    assert lq.shape[:2] == ids.shape[:2] == student_logits.shape[:2]
    group = get_tensor_model_parallel_group() if get_tensor_model_parallel_world_size() > 1 else None
    return topk_outputs(student_logits, ids, lq, config.distillation_loss, _state["options"], process_group=group,
                        masses_clamped=True)


# ------------------------------------------------------------------------------------------------ the loss modes

def _entropy(model_output, data):
    entropy = model_output.get("entropy") if hasattr(model_output, "get") else None
    if entropy is None:
        return None
    return _verl("verl.workers.utils.padding").no_padding_2_padding(entropy, data)


def _weigh(losses, valid, divergence, confidence=None, token_logprobs=None, entropy=None):
    """losses [bsz, resp_len] times wpkl's weights (``options().weighting``), with the weights' metrics."""
    weighting = _state["options"].weighting if _state["options"] is not None else None
    if weighting is None:
        return losses, {}
    if weighting.confidence and confidence is None:
        raise ValueError("Weighting(confidence=...) needs the teacher's top-k: use the loss mode " + TOPK_NAME)
    if weighting.prefix_confidence is not None and token_logprobs is None:
        raise ValueError("Weighting(prefix_confidence=...) needs log q(y) of the sampled tokens: use a wpkl_<estimator> "
                         "loss mode (the top-k data holds no log q(y))")
    if weighting.needs_student_entropy and entropy is None:
        raise ValueError("Weighting(token_importance=...) needs the student's entropy in verl's model output: set "
                         "actor_rollout_ref.actor.calculate_entropy=True")
    w = compute_weights(weighting, valid=valid, divergence=divergence.detach().double(),
                        confidence=(torch.ones_like(losses, dtype=torch.float64) if confidence is None else
                                    confidence.double()),
                        teacher_token_logprobs=None if token_logprobs is None else token_logprobs.double(),
                        student_entropy=None if entropy is None else entropy.detach().double())
    from verl.utils.metric import AggregationType, Metric

    kept = w[valid]
    metrics = {"distillation/wpkl_weight_mean": Metric(AggregationType.MEAN, kept.mean() if kept.numel() else w.sum()),
               "distillation/wpkl_weight_min": Metric(AggregationType.MIN, kept.min() if kept.numel() else w.sum()),
               "distillation/wpkl_weight_max": Metric(AggregationType.MAX, kept.max() if kept.numel() else w.sum())}
    return losses * w.to(losses.dtype), metrics


def _response_mask(data):
    mask = data["response_mask"]
    return (mask.bool().to_padded_tensor(False) if mask.is_nested else mask.bool())


def _topk_loss(config, distillation_config, model_output, data):
    """``wpkl_forward_kl_topk``: verl's ``forward_kl_topk`` loss, weighted."""
    losses_mod = _verl("verl.trainer.distillation.losses")
    losses, metrics = losses_mod.compute_forward_kl_topk(config, distillation_config, model_output, data)
    padding = _verl("verl.workers.utils.padding")
    teacher_lp = padding.no_padding_2_padding(data["teacher_logprobs"], data)
    confidence = teacher_lp.float().amax(-1).exp()
    divergence = padding.no_padding_2_padding(model_output["distillation_losses"], data)
    weighted, weight_metrics = _weigh(losses, _response_mask(data), divergence, confidence=confidence,
                                      entropy=_entropy(model_output, data))
    return weighted, {**metrics, **weight_metrics}


def _estimator_loss(name):
    def loss(config, distillation_config, model_output, data):
        """``wpkl_<estimator>``: verl's sampled-token estimator, weighted."""
        padding = _verl("verl.workers.utils.padding")
        core = _verl("verl.trainer.ppo.core_algos")
        from verl.utils.metric import AggregationType, Metric

        student = padding.no_padding_2_padding(model_output["log_probs"], data)
        teacher = padding.no_padding_2_padding(data["teacher_logprobs"], data).squeeze(-1)
        valid = _response_mask(data)
        if name == "power":  # PowerOPD: -advantage = p(y)^alpha - q(y)^alpha, constant (a reward)
            if not distillation_config.distillation_loss.use_policy_gradient:
                raise ValueError(f"{POWER_NAME} is PowerOPD's advantage: set "
                                 "distillation.distillation_loss.use_policy_gradient=True")
            alpha = _state["options"].sampled_power
            losses = ((alpha * student.detach()).exp() - (alpha * teacher).exp()).to(student.dtype)
        else:
            losses = core.kl_penalty(logprob=student, ref_logprob=teacher, kl_penalty=name)
        metrics = {"distillation/abs_loss": Metric(AggregationType.MEAN, losses[valid].abs().mean())}
        weighted, weight_metrics = _weigh(losses, valid, (teacher - student).abs(), token_logprobs=teacher,
                                          entropy=_entropy(model_output, data))
        return weighted, {**metrics, **weight_metrics}

    loss.__name__ = f"wpkl_{name}"
    return loss


# ------------------------------------------------------------------------------------------------- use and undo

def use_wpkl(topk_mode: str = "verl", divergence: str = "forward_kl", *, weighting: Weighting | None = None,
             beta: float = 0.5, backend: str = "auto", sampled_power: float = 5.0) -> VerlOptions:
    """Route verl's top-k logits processor through wpkl and register the ``wpkl_`` loss modes (module docstring).
    Calling it again replaces the options; ``undo()`` restores verl exactly."""
    opts = VerlOptions(topk_mode, divergence, beta, weighting, backend, sampled_power)
    losses_mod = _verl("verl.trainer.distillation.losses")
    for strategy, replacement in (("fsdp", _fsdp_topk), ("megatron", _megatron_topk)):
        try:
            module = importlib.import_module(_MODULES[strategy])
        except ImportError:  # the Megatron module needs megatron-core: patched only where it imports
            continue
        if strategy not in _state["patched"]:
            _state["patched"][strategy] = (module, module.compute_forward_kl_topk)
        module.compute_forward_kl_topk = replacement
    if not _state["registered"]:
        settings = losses_mod.DistillationLossSettings
        losses_mod.register_distillation_loss(settings(names=[TOPK_NAME], use_topk=True))(_topk_loss)
        for name in (*ESTIMATORS, "power"):
            losses_mod.register_distillation_loss(settings(names=[f"wpkl_{name}"], use_estimator=True))(
                _estimator_loss(name))
        _state["registered"] = [TOPK_NAME, *(f"wpkl_{n}" for n in (*ESTIMATORS, "power"))]
    _state["options"] = opts
    return opts


def undo() -> None:
    """Restore verl's logits processors and remove the ``wpkl_`` loss modes."""
    for module, original in _state["patched"].values():
        module.compute_forward_kl_topk = original
    _state["patched"].clear()
    if _state["registered"]:
        losses_mod = _verl("verl.trainer.distillation.losses")
        for name in _state["registered"]:
            losses_mod.DISTILLATION_LOSS_REGISTRY.pop(name, None)
            losses_mod.DISTILLATION_SETTINGS_REGISTRY.pop(name, None)
        _state["registered"] = []
    _state["options"] = None
