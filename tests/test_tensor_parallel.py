"""Vocabulary parallelism (``process_group=``): on every rank the same loss, TokenStats and weights as one
device on the full vocabulary, and the rank's slice of the full gradient.

Each world size (2 and 3) spawns one gloo group on the CPU that runs every case (spawning costs seconds; a case
costs milliseconds): each rank builds the same full-vocabulary inputs from the case's seed, computes the
single-process result, then its own shard's, and compares. Bad inputs must raise on every rank (no rank left
waiting in a collective): after each, a good call checks the ranks are still in step.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import pytest
import torch
from utils import assert_bad_inputs_raised, assert_ranks_passed, leave_worker, spawn_worlds

WORLD_SIZES = (2, 3)
SPAWN_TIMEOUT_S = 240


# ------------------------------------------------------------------------------------------------ the cases

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32, scale=2.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _slice(x, rank, world, dim=-1):
    return x.chunk(world, dim=dim)[rank] if x is not None else None


def _close(actual, expected, what, dtype):
    """Half-precision results (the gradient of half logits) to a unit in their last place; float32 results
    (accumulated in float32 on both sides, in another order) closely; float64 to rounding."""
    if actual.dtype in (torch.bfloat16, torch.float16):
        tol = dict(rtol=2e-2, atol=1e-4) if actual.dtype == torch.bfloat16 else dict(rtol=2e-3, atol=1e-5)
    else:
        tol = dict(rtol=2e-5, atol=2e-6) if dtype != torch.float64 else dict(rtol=1e-10, atol=1e-12)
    half = (torch.bfloat16, torch.float16)
    torch.testing.assert_close(actual.float() if actual.dtype in half else actual,
                               expected.float() if expected.dtype in half else expected,
                               equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def _compare(out, ref, dtype):
    (loss, stats), (loss_r, stats_r) = out, ref
    _close(loss, loss_r, "loss", dtype)
    for name in ("divergence", "weight", "teacher_confidence", "teacher_entropy", "student_entropy", "position"):
        _close(getattr(stats, name), getattr(stats_r, name), f"stats.{name}", dtype)
    assert torch.equal(stats.mask, stats_r.mask)


def _backward(loss, g):
    if loss.dim():
        loss = (loss * torch.rand(loss.shape, generator=g, dtype=loss.dtype)).sum()
    loss.backward()


def logits_case(rank, world, group, *, seed, dtype=torch.float32, divergence="reverse_kl", reduction="mean",
                weighting=None, v_local=5, temperature=0.7, beta=0.3, sampled_variant=None, packed=False,
                backend="torch", masked_row=True, token_owner=None, use_module=False, ref_backend=None,
                banned=False, extra=None):
    """Materialized logits: the single-process loss on the full vocabulary against this rank's shard's."""
    import wpkl

    g = _gen(seed)
    B, T = 2, 4
    V = v_local * world
    s = _randn(g, B, T, V, dtype=dtype)
    t = _randn(g, B, T, V, dtype=dtype)
    if banned:  # -inf logits: one token's whole first slice (both models), and scattered banned tokens
        s[0, 1, :v_local] = t[0, 1, :v_local] = float("-inf")
        s[0, 2, 1::3] = t[0, 2, 1::3] = float("-inf")
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    if masked_row:
        mask[1] = False
    if token_owner is None:
        tokens = torch.randint(0, V, (B, T), generator=g)
    else:  # every sampled token on one rank's slice
        tokens = token_owner * v_local + torch.randint(0, v_local, (B, T), generator=g)
    kw = dict(mask=mask, divergence=divergence, reduction=reduction, weighting=weighting, temperature=temperature,
              beta=beta, tokens=tokens, return_stats=True, backend=backend, **(extra or {}))
    teacher_full, teacher_shard = t, _slice(t, rank, world)
    if divergence == "sampled" and sampled_variant in ("teacher_logprobs", "both"):
        kw["teacher_logprobs"] = -torch.rand(B, T, generator=g) * 3
        teacher_full = teacher_shard = None
    if divergence == "sampled" and sampled_variant in ("rollout_logprobs", "both"):
        kw["rollout_logprobs"] = -torch.rand(B, T, generator=g) * 3
    if packed:
        pos = torch.arange(T).repeat(B)
        kw.update(positions=pos)
        kw = {k: (v.reshape(B * T) if isinstance(v, torch.Tensor) and v.shape == (B, T) else v) for k, v in kw.items()}
        s, t = s.reshape(B * T, V), t.reshape(B * T, V)
        teacher_full = None if teacher_full is None else t
        teacher_shard = None if teacher_shard is None else _slice(t, rank, world)
    full = s.clone().requires_grad_(True)
    ref = wpkl.weighted_kl_loss(full, teacher_full, **{**kw, "backend": ref_backend or backend})
    _backward(ref[0], _gen(seed + 1))
    shard = _slice(s, rank, world).clone().requires_grad_(True)
    if use_module:
        module = wpkl.WeightedKLLoss(weighting=weighting, divergence=divergence, beta=beta, temperature=temperature,
                                     reduction=reduction, backend=backend, process_group=group)
        out = module(shard, teacher_shard, mask=kw["mask"], tokens=kw["tokens"], return_stats=True,
                     positions=kw.get("positions"))
    else:
        out = wpkl.weighted_kl_loss(shard, teacher_shard, process_group=group, **kw)
    _backward(out[0], _gen(seed + 1))
    _compare(out, ref, dtype)
    _close(shard.grad, _slice(full.grad, rank, world), "grad (this rank's slice)", dtype)


def topk_case(rank, world, group, *, seed, mode="tail", divergence="forward_kl", dtype=torch.float32, v_local=7,
              reduction="mean", weighting=None, raw_clamps=False, backend="torch"):
    import wpkl

    g = _gen(seed)
    B, T, K = 2, 3, 4
    V = v_local * world
    s = _randn(g, B, T, V, dtype=dtype)
    # ids spread over every rank's slice: K distinct global ids per token, some padded with -1
    ids = torch.argsort(torch.rand(B, T, V, generator=g), dim=-1)[..., :K]
    ids[0, 1, -1] = -1
    ids[1, 2, 1:] = -1
    logprobs = torch.log_softmax(_randn(g, B, T, V), dim=-1).gather(-1, ids.clamp_min(0))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 0] = False
    kw = dict(mask=mask, divergence=divergence, reduction=reduction, weighting=weighting, temperature=1.3,
              teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, topk_mode=mode, return_stats=True,
              backend=backend)
    if raw_clamps:
        kw.update(topk_logprob_floor=-3.0, topk_loss_max=0.5)
    full = s.clone().requires_grad_(True)
    ref = wpkl.weighted_kl_loss(full, None, **kw)
    _backward(ref[0], _gen(seed + 1))
    shard = _slice(s, rank, world).clone().requires_grad_(True)
    out = wpkl.weighted_kl_loss(shard, None, process_group=group, **kw)
    _backward(out[0], _gen(seed + 1))
    _compare(out, ref, dtype)
    _close(shard.grad, _slice(full.grad, rank, world), "grad (this rank's slice)", dtype)


def linear_case(rank, world, group, *, seed, divergence="reverse_kl", reduction="mean", weighting=None,
                dtype=torch.float32, v_local=5, chunk_size=3, bias=True, softcap=None, teacher="logits",
                use_module=False, backend="torch", extra=None):
    """The fused-linear form with the lm_heads sharded by vocabulary rows: loss, stats, the full hidden-state
    gradient, this rank's rows of the weight and bias gradients."""
    import wpkl

    g = _gen(seed)
    B, T, H, H_t = 2, 4, 6, 5
    V = v_local * world
    h = _randn(g, B, T, H, dtype=dtype, scale=1.0)
    w = _randn(g, V, H, dtype=dtype, scale=0.7)
    b = _randn(g, V, scale=0.5) if bias else None
    h_t = _randn(g, B, T, H_t, scale=1.0)
    w_t = _randn(g, V, H_t, scale=0.7)
    b_t = _randn(g, V, scale=0.5) if bias else None
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    mask[1, -1] = False
    tokens = torch.randint(0, V, (B, T), generator=g)
    kw = dict(mask=mask, tokens=tokens, divergence=divergence, reduction=reduction, weighting=weighting,
              temperature=0.8, return_stats=True, backend=backend, chunk_size=chunk_size, student_softcap=softcap,
              student_logit_scale=1.1, **(extra or {}))
    if teacher == "topk":
        ids = torch.argsort(torch.rand(B, T, V, generator=g), dim=-1)[..., :3]
        # a teacher's log-probabilities (their mass below 1: a sum above 1 makes the tail ill-conditioned)
        logprobs = torch.log_softmax(_randn(g, B, T, V), dim=-1).gather(-1, ids)
        kw.update(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)
        kw.pop("tokens")
        h_t = w_t = b_t = None
    elif teacher == "logprobs":
        kw.update(teacher_logprobs=-torch.rand(B, T, generator=g) * 3)
        h_t = w_t = b_t = None

    def run(weights, process_group):
        hidden = h.clone().requires_grad_(True)
        weight, bias_ = (x if x is None else x.clone().requires_grad_(True) for x in weights[:2])
        if use_module and process_group is not None:
            module = wpkl.FusedLinearWeightedKLLoss(
                weighting=weighting, divergence=divergence, temperature=0.8, reduction=reduction, backend=backend,
                student_logit_scale=1.1, student_softcap=softcap, chunk_size=chunk_size, process_group=process_group)
            out = module(hidden, weight, h_t, weights[2], mask=mask, tokens=kw.get("tokens"), return_stats=True,
                         student_bias=bias_, teacher_bias=weights[3], teacher_logprobs=kw.get("teacher_logprobs"))
        else:
            out = wpkl.fused_linear_kl_loss(hidden, weight, h_t, weights[2], student_bias=bias_,
                                            teacher_bias=weights[3], process_group=process_group, **kw)
        _backward(out[0], _gen(seed + 1))
        return out, hidden.grad, weight.grad, None if bias_ is None else bias_.grad

    ref, gh, gw, gb = run((w, b, w_t, b_t), None)
    out, gh_s, gw_s, gb_s = run([_slice(x, rank, world, dim=0) for x in (w, b, w_t, b_t)], group)
    _compare(out, ref, dtype)
    _close(gh_s, gh, "grad of the hidden states (full, all-reduced)", dtype)
    _close(gw_s, _slice(gw, rank, world, dim=0), "grad of the weight (this rank's rows)", dtype)
    if bias:
        _close(gb_s, _slice(gb, rank, world, dim=0), "grad of the bias (this rank's rows)", dtype)


def close_case(rank, world, group, *, seed, divergence="reverse_kl"):
    """A student within 1e-3 of its teacher at logits around 40 (D ~ 1e-7): the Triton route merges the slices'
    divergences and exact lse gaps, so its D stays as close to the float64 truth as one device's kernel (a
    difference of the merged float32 log-normalizers would be off by ~1e-6, and negative)."""
    import wpkl

    g = _gen(seed)
    V = 7 * world
    s = _randn(g, 3, 4, V) + 40.0
    t = s + 1e-3 * _randn(g, 3, 4, V, scale=1.0)
    kw = dict(divergence=divergence, reduction="none", return_stats=True, backend="triton")
    _, one = wpkl.weighted_kl_loss(s, t, **kw)
    _, sharded = wpkl.weighted_kl_loss(_slice(s, rank, world), _slice(t, rank, world), process_group=group, **kw)
    _, truth = wpkl.weighted_kl_loss(s.double(), t.double(), backend="reference", divergence=divergence,
                                     reduction="none", return_stats=True)
    error_one = (one.divergence.double() - truth.divergence).abs().max().item()
    error = (sharded.divergence.double() - truth.divergence).abs().max().item()
    assert error <= max(2 * error_one, 3e-8), (error, error_one, truth.divergence.abs().max().item())


def no_copy_case(rank, world, group, *, seed):
    """The Triton route's "sampled" gathers the sampled tokens' logits from the shifted [B, T, V] views as
    given (logits[:, :-1], strided): never from a copy of the rank's [N, V_local] slice."""
    import wpkl
    import wpkl.parallel.merge as merge

    g = _gen(seed)
    full_s, full_t = _randn(g, 2, 5, 6 * world), _randn(g, 2, 5, 6 * world + 2)
    s = _slice(full_s, rank, world).clone()[:, :-1]  # what an lm_head's shifted logits look like
    t = _slice(full_t[..., :6 * world], rank, world).clone()[:, :-1]
    seen = []
    original = merge.owned_logit

    def spy(x, local):
        seen.append(x.untyped_storage().data_ptr())
        return original(x, local)

    merge.owned_logit = spy
    try:
        wpkl.weighted_kl_loss(s, t, tokens=torch.randint(0, 6 * world, (2, 4), generator=g), divergence="sampled",
                              backend="triton", process_group=group)
    finally:
        merge.owned_logit = original
    assert seen == [s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()], "a copy of the logits"


def triton_case(rank, world, group, *, seed, form="logits", **options):
    """backend="triton": the kernels on each slice, merged (jsd: its normalizers, then its second pass's sums),
    against the single-process kernels on the full vocabulary (the Triton interpreter on the CPU)."""
    (linear_case if form == "linear" else logits_case)(rank, world, group, seed=seed, backend="triton", **options)


def collectives_case(rank, world, group, *, seed):
    """The collectives per call that docs/design.md counts (torch path, fp32 logits, one chunk of rows)."""
    import wpkl
    import wpkl.parallel.vocab as tp

    shards = []
    original = tp.VocabShard.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        shards.append(self)

    tp.VocabShard.__init__ = recording
    try:
        g = _gen(seed)
        s, t = _randn(g, 2, 3, 5 * world).requires_grad_(True), _randn(g, 2, 3, 5 * world)
        counts = {}
        for backend, divergence, stats in (("torch", "reverse_kl", True), ("torch", "reverse_kl", False),
                                           ("torch", "sampled", False), ("triton", "reverse_kl", True),
                                           ("triton", "sampled", False)):
            x = _slice(s.detach(), rank, world).clone().requires_grad_(True)
            loss = wpkl.weighted_kl_loss(x, _slice(t, rank, world), divergence=divergence, backend=backend,
                                         tokens=torch.zeros(2, 3, dtype=torch.long), return_stats=stats,
                                         process_group=group)
            loss.backward() if not stats else loss[0].backward()
            counts[f"{backend}, {divergence}, stats={stats}"] = shards[-1].calls
        h = _randn(g, 2, 3, 4).requires_grad_(True)
        for backend in ("torch", "triton"):  # 6 tokens in 3 chunks of 2, and the hidden states' gradient
            w = _randn(g, 5, 4).requires_grad_(True)
            loss = wpkl.fused_linear_kl_loss(h, w, h.detach(), _randn(g, 5, 4), chunk_size=2, backend=backend,
                                             process_group=group)
            loss.backward()
            counts[f"{backend}, fused-linear"] = shards[-1].calls
    finally:
        tp.VocabShard.__init__ = original
    # torch: the two log-normalizers (a max, a sum), the copy's backward, the divergence's sum (sampled: log p(y)
    # and log q(y)); the stats: the confidence's max, the entropies. Triton: max, then sums.
    assert counts == {"torch, reverse_kl, stats=True": 6, "torch, reverse_kl, stats=False": 4,
                      "torch, sampled, stats=False": 4, "triton, reverse_kl, stats=True": 2,
                      "triton, sampled, stats=False": 2, "torch, fused-linear": 3 * 4 + 1,
                      "triton, fused-linear": 3 * 2 + 1}, counts


def _weightings():
    import wpkl

    return [
        None,
        wpkl.Weighting(position=wpkl.ExpDecay(3.0), confidence=1.0, disagreement=0.5),
        wpkl.Weighting(accumulated=0.5, normalize=True),
        wpkl.Weighting(accumulated=0.5, normalize=False, w_max=1.3),
        wpkl.Weighting(position=wpkl.PowerDecay(0.5), normalize=False),
        wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence(window=2), normalize=True),
    ]


def good_cases(world=2):
    """(name, function, kwargs) of every case that must match the single-process result (the Triton
    interpreter's cases cost a second or two each: a world of 3 runs a few of them)."""
    cases = []
    seed = 100
    divergences = [("reverse_kl", None), ("forward_kl", None), ("jsd", None), ("sampled", None),
                   ("sampled", "teacher_logprobs"), ("sampled", "rollout_logprobs"), ("sampled", "both")]
    reductions = ("mean", "sum", "seq_mean", "none")
    for dtype in (torch.float32, torch.bfloat16):
        for i, (divergence, variant) in enumerate(divergences):
            for j, reduction in enumerate(reductions):
                seed += 1
                weighting = _weightings()[(i + j) % 5]
                if variant in ("teacher_logprobs", "both") and weighting is not None and weighting.confidence:
                    weighting = None  # no teacher logits: no confidence
                name = f"logits-{divergence}-{variant}-{reduction}-{str(dtype)[6:]}-w{(i + j) % 5}"
                cases.append((name, logits_case, dict(seed=seed, dtype=dtype, divergence=divergence,
                                                      sampled_variant=variant, reduction=reduction,
                                                      weighting=weighting, v_local=5 if j % 2 else 7)))
    for k, weighting in enumerate(_weightings()):
        for divergence in ("reverse_kl", "jsd"):
            seed += 1
            cases.append((f"weighting{k}-{divergence}", logits_case,
                          dict(seed=seed, divergence=divergence, weighting=weighting, dtype=torch.float64)))
    for owner in range(3):  # sampled tokens all on one rank's slice (owner >= world: skipped there)
        seed += 1
        cases.append((f"sampled-owner{owner}", logits_case, dict(seed=seed, divergence="sampled", token_owner=owner)))
    seed += 1
    cases.append(("packed-positions", logits_case, dict(seed=seed, packed=True, reduction="seq_mean",
                                                        weighting=_weightings()[1])))
    seed += 1
    cases.append(("module", logits_case, dict(seed=seed, use_module=True, weighting=_weightings()[2])))
    seed += 1
    cases.append(("reference-backend", logits_case, dict(seed=seed, backend="reference", divergence="jsd",
                                                         dtype=torch.float64, weighting=_weightings()[2])))
    for divergence in ("reverse_kl", "forward_kl", "jsd"):
        seed += 1
        cases.append((f"banned-{divergence}", logits_case, dict(seed=seed, divergence=divergence, banned=True,
                                                               v_local=4)))
    seed += 1
    cases.append(("token-weights-num-items", logits_case, dict(
        seed=seed, weighting=_weightings()[1], extra=dict(token_weights=torch.rand(2, 4, generator=_gen(seed)) + 0.1,
                                                          num_items_in_batch=torch.tensor(9.0)))))
    seed += 1
    cases.append(("float16", logits_case, dict(seed=seed, dtype=torch.float16, divergence="forward_kl")))
    seed += 1
    cases.append(("temperature-1", logits_case, dict(seed=seed, temperature=1.0, divergence="forward_kl")))
    for mode, divergence, clamps in (("tail", "forward_kl", False), ("tail", "reverse_kl", False),
                                     ("renormalize", "jsd", False), ("raw", "forward_kl", True),
                                     ("raw", "reverse_kl", False)):
        for dtype in (torch.float32, torch.bfloat16):
            seed += 1
            cases.append((f"topk-{mode}-{divergence}-{str(dtype)[6:]}", topk_case,
                          dict(seed=seed, mode=mode, divergence=divergence, dtype=dtype, raw_clamps=clamps,
                               weighting=_weightings()[seed % 4], reduction=("mean", "none")[seed % 2])))
    linear = [dict(), dict(reduction="none"), dict(divergence="jsd", weighting=_weightings()[2], chunk_size=8),
              dict(divergence="forward_kl", weighting=_weightings()[1], softcap=3.0),
              dict(divergence="sampled", teacher="logprobs", bias=False),
              dict(divergence="sampled", reduction="sum"), dict(teacher="topk", divergence="forward_kl"),
              dict(dtype=torch.bfloat16, divergence="jsd"), dict(use_module=True, reduction="seq_mean"),
              dict(weighting=_weightings()[3], chunk_size=2), dict(backend="reference", weighting=_weightings()[1])]
    for options in linear:
        seed += 1
        name = "linear-" + "-".join(f"{k}={v}" for k, v in options.items() if k != "weighting") or "linear"
        cases.append((name, linear_case, dict(seed=seed, **options)))
    triton = [dict(weighting=_weightings()[1]), dict(divergence="forward_kl", dtype=torch.bfloat16, reduction="none"),
              dict(divergence="sampled", weighting=_weightings()[2]), dict(divergence="sampled", token_owner=1),
              dict(divergence="sampled", sampled_variant="both", reduction="sum"),
              dict(divergence="sampled", sampled_variant="rollout_logprobs", dtype=torch.bfloat16),
              dict(divergence="jsd", weighting=_weightings()[3]), dict(temperature=1.0, v_local=9),
              dict(divergence="reverse_kl", weighting=_weightings()[5], ref_backend="torch"),
              dict(divergence="reverse_kl", banned=True, v_local=4),
              dict(divergence="sampled", banned=True, v_local=4, reduction="none"),
              dict(form="linear"), dict(form="linear", divergence="sampled", reduction="none"),
              dict(form="linear", divergence="forward_kl", dtype=torch.bfloat16, weighting=_weightings()[2]),
              dict(form="linear", divergence="sampled", teacher="logprobs", chunk_size=8)]
    for i, options in enumerate(triton):
        seed += 1
        if world > 2 and i not in (0, 1, 3, 9, 10):
            continue
        name = "triton-" + "-".join(f"{k}={v}" for k, v in options.items() if k != "weighting")
        cases.append((name, triton_case, dict(seed=seed, **options)))
    for divergence in ("reverse_kl", "forward_kl"):
        cases.append((f"close-{divergence}", close_case, dict(seed=seed + 2, divergence=divergence)))
    cases.append(("no copy for sampled", no_copy_case, dict(seed=seed + 3)))
    cases.append(("collectives", collectives_case, dict(seed=seed + 1)))
    # the OPD variants (tests/test_variants.py) on vocabulary shards
    import wpkl

    variants = [("powered", dict(divergence="sampled", extra=dict(sampled_power=5.0))),
                ("powered rollout bf16", dict(divergence="sampled", sampled_variant="rollout_logprobs",
                                               dtype=torch.bfloat16, extra=dict(sampled_power=5.0))),
                ("powered logprobs", dict(divergence="sampled", sampled_variant="teacher_logprobs",
                                          extra=dict(sampled_power=3.0), reduction="none")),
                ("tip", dict(weighting=wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5)))),
                ("pw-opsd", dict(weighting=wpkl.Weighting(position=wpkl.PositionSigmoid(), normalize=False),
                                 reduction="seq_mean", divergence="forward_kl"))]
    for i, (name, options) in enumerate(variants):
        cases.append((name, logits_case, dict(seed=seed + 10 + i, **options)))
        if world == 2:
            cases.append((f"triton {name}", triton_case, dict(seed=seed + 20 + i, **options)))
    # ... on the fused-linear form and a top-k teacher too, on both backends
    tip = wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5))
    pw_opsd = dict(weighting=wpkl.Weighting(position=wpkl.PositionSigmoid(), normalize=False), reduction="seq_mean")
    forms = [("tip linear", linear_case, dict(weighting=tip)),
             ("pw-opsd linear", linear_case, dict(divergence="forward_kl", **pw_opsd)),
             ("powered linear", linear_case, dict(divergence="sampled", extra=dict(sampled_power=5.0))),
             ("powered linear logprobs", linear_case, dict(divergence="sampled", teacher="logprobs",
                                                           extra=dict(sampled_power=5.0))),
             ("tip top-k", topk_case, dict(weighting=tip)),
             ("pw-opsd top-k", topk_case, dict(**pw_opsd))]
    for i, (name, fn, options) in enumerate(forms):
        for backend in ("torch", "triton") if world == 2 else ("triton",):
            cases.append((f"{name} {backend}", fn, dict(seed=seed + 30 + i, backend=backend, **options)))
    return cases


def _bad_inputs(rank, world, group):
    """(name, function that makes this rank's call, a phrase every rank's error contains)."""
    import wpkl

    g = _gen(7)
    B, T, v = 2, 3, 5
    s, t = _randn(g, B, T, v * world), _randn(g, B, T, v * world)
    tokens = torch.randint(0, v * world, (B, T), generator=g)
    mine = _slice(s, rank, world)

    def call(student, teacher, **kw):
        return wpkl.weighted_kl_loss(student, teacher, process_group=group, backend="torch",
                                     **{"tokens": tokens, **kw})

    def uneven():  # a vocabulary the group's size does not divide: tensor_split's uneven slices
        V = v * world + 1
        full_s, full_t = _randn(g, B, T, V), _randn(g, B, T, V)
        return call(full_s.tensor_split(world, dim=-1)[rank], full_t.tensor_split(world, dim=-1)[rank])

    def one_rank_wider():
        extra = 1 if rank == 0 else 0
        return call(_randn(g, B, T, v + extra), _randn(g, B, T, v + extra))

    def teacher_shard_mismatch():  # a padded teacher sharded differently from the student: V_t local != V local
        return call(mine, _randn(g, B, T, v + 1))

    def teacher_mismatch_one_rank():
        return call(mine, _randn(g, B, T, v + (1 if rank == world - 1 else 0)))

    def token_out_of_range():  # ids are global: V_local <= id < V is fine, V is not
        return call(mine, _slice(t, rank, world), tokens=torch.full((B, T), v * world), divergence="sampled")

    def bad_token_one_rank():
        bad = tokens.clone()
        if rank == 1:
            bad[0, 0] = -3
        return call(mine, _slice(t, rank, world), tokens=bad, divergence="sampled")

    def leading_shape_one_rank():
        rows = T + (1 if rank == 0 else 0)
        return call(_randn(g, B, rows, v), _randn(g, B, rows, v), tokens=None)

    def options_differ():
        return call(mine, _slice(t, rank, world), divergence="forward_kl" if rank == 0 else "reverse_kl")

    def bad_option_one_rank():
        return call(mine, _slice(t, rank, world), temperature=-1.0 if rank == world - 1 else 1.0)

    def linear_uneven():
        return wpkl.fused_linear_kl_loss(_randn(g, B, T, 4), _randn(g, v + (rank == 0), 4), _randn(g, B, T, 4),
                                         _randn(g, v + (rank == 0), 4), process_group=group, backend="torch")

    def linear_teacher_mismatch():
        return wpkl.fused_linear_kl_loss(_randn(g, B, T, 4), _randn(g, v, 4), _randn(g, B, T, 4),
                                         _randn(g, v + 2, 4), process_group=group, backend="torch")

    def topk_id_out_of_range():
        ids = torch.zeros(B, T, 2, dtype=torch.long)
        ids[..., 1] = v * world
        return call(mine, None, tokens=None, divergence="forward_kl", teacher_topk_ids=ids,
                    teacher_topk_logprobs=-torch.ones(B, T, 2))

    def mask_differs_on_one_rank():  # every rank's loss would differ (the Triton route) or its collectives
        mask = torch.ones(B, T, dtype=torch.bool)
        if rank == world - 1:
            mask[0, 1] = False
        return call(mine, _slice(t, rank, world), mask=mask)

    def tokens_differ_on_one_rank():
        bad = tokens.clone()
        if rank == 0:
            bad[1, 2] = (bad[1, 2] + 1) % (v * world)
        return call(mine, _slice(t, rank, world), tokens=bad, divergence="sampled")

    def chunk_size_differs():  # the fused-linear chunks decide how many collectives each rank makes
        return wpkl.fused_linear_kl_loss(_randn(g, B, T, 4), _randn(g, v, 4), _randn(g, B, T, 4), _randn(g, v, 4),
                                         process_group=group, backend="torch", chunk_size=2 + (rank == 0))

    def not_a_group():
        return wpkl.weighted_kl_loss(mine, _slice(t, rank, world), process_group="world")

    return [
        ("uneven vocabulary", uneven, "differ in size"),
        ("one rank's shard wider", one_rank_wider, "must divide the vocabulary"),
        ("teacher shard mismatch", teacher_shard_mismatch, "same vocabulary slice"),
        ("teacher mismatch on one rank", teacher_mismatch_one_rank, ("same vocabulary slice", "rejected")),
        ("token out of the global range", token_out_of_range, f"[0, {v * world})"),
        ("bad token on one rank", bad_token_one_rank, ("tokens must lie", "rejected")),
        ("leading shape on one rank", leading_shape_one_rank, "disagree on the leading size"),
        ("options differ", options_differ, "disagree on the options"),
        ("bad option on one rank", bad_option_one_rank, ("temperature", "rejected")),
        ("fused-linear uneven", linear_uneven, "differ in size"),
        ("fused-linear teacher mismatch", linear_teacher_mismatch, "same vocabulary slice"),
        ("top-k id out of range", topk_id_out_of_range, "teacher_topk_ids must lie"),
        ("not a process group", not_a_group, "ProcessGroup"),
        ("mask differs on one rank", mask_differs_on_one_rank, "disagree on the mask and tokens"),
        ("tokens differ on one rank", tokens_differ_on_one_rank, "disagree on the mask and tokens"),
        ("fused-linear chunk size differs", chunk_size_differs, "disagree on the options"),
    ]


def bad_input_cases(rank, world, group) -> dict:
    """Each bad input raises on every rank, with its message; afterwards the ranks are still in step."""
    import torch.distributed as dist

    results = {}
    for name, make_call, phrases in _bad_inputs(rank, world, group):
        phrases = (phrases,) if isinstance(phrases, str) else phrases
        try:
            make_call()
            results[f"bad: {name}"] = "did not raise"
        except (ValueError, TypeError) as e:
            ok = any(p in str(e) for p in phrases)
            results[f"bad: {name}"] = None if ok else f"raised {type(e).__name__}: {e} (expected one of {phrases})"
        # In step: one all-reduce of the case's index; a rank that skipped or added a collective breaks it.
        probe = torch.tensor([float(len(results))])
        dist.all_reduce(probe, group=group)
        if probe.item() != len(results) * world:
            results[f"bad: {name}"] = f"ranks out of step after this case ({probe.item()})"
            break
    return results


# ------------------------------------------------------------------------------------------ the process group

def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))  # a subgroup, not only WORLD
    results, timings = {}, {}
    for name, function, kwargs in good_cases(world):
        if "owner" in name and int(name[-1]) >= world:
            continue
        start = time.perf_counter()
        try:
            function(rank, world, group, **kwargs)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per case
            results[name] = traceback.format_exc(limit=4)
        timings[name] = time.perf_counter() - start
        dist.barrier(group=group)  # a failed case must not leave the ranks out of step
    results.update(bad_input_cases(rank, world, group))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(results=results, timings=timings), f)
    dist.destroy_process_group()
    leave_worker()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return spawn_worlds(_worker, {world: str(tmp_path_factory.mktemp(f"tp{world}")) for world in WORLD_SIZES},
                        SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_case_matches_one_device(worlds, world):
    ran = sorted(name for name in worlds[world][0]["results"] if not name.startswith("bad: "))
    expected = sorted(name for name, _, _ in good_cases(world) if not ("owner" in name and int(name[-1]) >= world))
    assert ran == expected, f"{len(ran)} of {len(expected)} cases ran"
    assert_ranks_passed(worlds[world])


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_bad_inputs_raise_on_every_rank(worlds, world):
    assert_bad_inputs_raised(worlds[world], 16)


def test_single_device_needs_no_group():
    """process_group=None is the default everywhere; a process_group without torch.distributed raises."""
    import inspect

    import wpkl

    for function in (wpkl.weighted_kl_loss, wpkl.fused_linear_kl_loss, wpkl.WeightedKLLoss,
                     wpkl.FusedLinearWeightedKLLoss):
        assert inspect.signature(function).parameters["process_group"].default is None
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="init_process_group"):
        wpkl.weighted_kl_loss(s, s.clone(), process_group=object())
    for module in (wpkl.WeightedKLLoss, wpkl.FusedLinearWeightedKLLoss):  # fail at construction
        with pytest.raises(TypeError, match="ProcessGroup"):
            module(process_group="tp")
