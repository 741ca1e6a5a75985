"""Sequence parallelism (``sequence_group=``): a batch whose sequences are split over the ranks, in any way,
gives on each rank its share of the whole batch's loss (the ranks' losses sum to the single-process loss), its
rows of the whole gradient, of ``reduction="none"`` and of the stats, for every input form, weighting kind,
divergence and reduction; the trainers' layouts (wpkl.distributed) reassemble the batch; bad input raises on
every rank; a call makes an all-gather and an all-reduce (with ``sequence_bounds`` the all-reduce alone, and no
host sync) and its backward none.

Each world size (2, 3, 4) spawns one gloo group on the CPU that runs every case: each rank builds the same whole
batch from the case's seed, computes the single-process result, then its own tokens' and compares.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import pytest
import torch
from utils import assert_bad_inputs_raised, assert_ranks_passed, free_port, leave_worker, spawn_worlds

WORLD_SIZES = (2, 3, 4)
SPAWN_TIMEOUT_S = 400


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(actual, expected, what, dtype=torch.float64):
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-6)
    torch.testing.assert_close(actual.to(expected.dtype), expected, equal_nan=True, msg=lambda m: f"{what}: {m}",
                               **tol)


def _batch(g, S=4, L=7, V=9, H=5, dtype=torch.float64, holes=True):
    """A whole batch laid out [S, L]: sequences of random lengths (the rest of each row is padding, masked),
    holes in the masks, one sequence fully masked."""
    lengths = torch.randint(1, L + 1, (S,), generator=g)
    lengths[0] = L
    inside = torch.arange(L) < lengths.unsqueeze(1)
    mask = inside & ((torch.rand(S, L, generator=g) > 0.2) if holes else True)
    mask[0, 0] = True
    mask[-1] = False  # a fully masked sequence
    data = dict(
        s=(torch.randn(S, L, V, generator=g) * 2).to(dtype), t=(torch.randn(S, L, V, generator=g) * 2).to(dtype),
        h=torch.randn(S, L, H, generator=g).to(dtype), th=torch.randn(S, L, H, generator=g).to(dtype),
        ws=torch.randn(V, H, generator=g).to(dtype), wt=torch.randn(V, H, generator=g).to(dtype),
        mask=mask, tokens=torch.randint(0, V, (S, L), generator=g),
        token_weights=torch.rand(S, L, generator=g).to(dtype) + 0.5,
        teacher_logprobs=-torch.rand(S, L, generator=g).to(dtype) * 3,
        rollout_logprobs=-torch.rand(S, L, generator=g).to(dtype) * 3,
        positions=torch.arange(L).expand(S, L).clone(), sequence_ids=torch.arange(S).unsqueeze(1).expand(S, L).clone())
    K = 3
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(S * L)]).reshape(S, L, K)
    ids[0, 1, -1] = -1  # a shorter list
    lq = torch.log_softmax(data["t"].double(), -1).gather(-1, ids.clamp_min(0)).to(dtype)
    data.update(topk_ids=ids, topk_logprobs=lq)
    return data


def _split(g, n, world):
    """A random split of n tokens over the ranks: each rank's indices, in a random order (some may be empty)."""
    perm = torch.randperm(n, generator=g)
    cuts = sorted(torch.randint(0, n + 1, (world - 1,), generator=g).tolist())
    bounds = [0, *cuts, n]
    return [perm[bounds[r]:bounds[r + 1]] for r in range(world)]


def _weightings():
    import wpkl

    return [
        None,
        wpkl.Weighting(position=wpkl.ExpDecay(3.0), confidence=1.0, disagreement=0.5),
        wpkl.Weighting(position=wpkl.PositionWindow(0.25, 0.75), normalize=True),
        wpkl.Weighting(accumulated=0.5, normalize=True),
        wpkl.Weighting(accumulated=1.0, w_max=1.4),
        wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence(window=3, worst=0.5), normalize=True),
        wpkl.Weighting(position=wpkl.PowerDecay(0.5), disagreement=1.0, normalize=True, w_max=2.0),
    ]


def _sum_over_ranks(x, group):
    import torch.distributed as dist

    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x


def _arguments(d, form, divergence, weighting, token_weights, num_items):
    """(function, tensors of leading shape [S, L] by name, other options) of a call on the whole batch."""
    import wpkl

    per_token = dict(mask=d["mask"])
    if divergence == "sampled":
        per_token.update(tokens=d["tokens"], rollout_logprobs=d["rollout_logprobs"])
    if token_weights:
        per_token["token_weights"] = d["token_weights"]
    if weighting is not None and weighting.prefix_confidence is not None:
        per_token["teacher_token_logprobs"] = d["teacher_logprobs"]
    options = dict(num_items_in_batch=num_items) if num_items is not None else {}
    if form == "linear":
        rows = dict(student_hidden=d["h"], teacher_hidden=None if divergence == "sampled" else d["th"])
        if divergence == "sampled":
            per_token.pop("teacher_token_logprobs", None)
            per_token["teacher_logprobs"] = d["teacher_logprobs"]
        options.update(student_weight=None, teacher_weight=None if divergence == "sampled" else d["wt"],
                       chunk_size=5)
        return wpkl.fused_linear_kl_loss, rows, per_token, options
    if form == "topk":
        rows = dict(student_logits=d["s"], teacher_logits=None)
        per_token.update(teacher_topk_ids=d["topk_ids"], teacher_topk_logprobs=d["topk_logprobs"])
        return wpkl.weighted_kl_loss, rows, per_token, options
    if form == "sampled_logprobs":
        rows = dict(student_logits=d["s"], teacher_logits=None)
        per_token.pop("teacher_token_logprobs", None)  # teacher_logprobs are log q(y) already
        per_token["teacher_logprobs"] = d["teacher_logprobs"]
        return wpkl.weighted_kl_loss, rows, per_token, options
    return wpkl.weighted_kl_loss, dict(student_logits=d["s"], teacher_logits=d["t"]), per_token, options


def split_case(rank, world, group, *, seed, form="logits", divergence="reverse_kl", reduction="mean",
               weighting=None, token_weights=False, num_items=None, backend="torch", dtype=torch.float64,
               use_module=False, shift=False, inference=False, extra=None, bounded=False):
    """A random split of the whole batch's places (padding included) over the ranks, each rank's tokens shuffled
    and passed packed, against the single-process call on the [S, L] batch. ``bounded``: with
    ``sequence_bounds`` (no host sync), a little larger than the batch."""
    import wpkl

    g = _gen(seed)
    d = _batch(g, dtype=dtype)
    S, L = d["mask"].shape
    fn, rows, per_token, options = _arguments(d, form, divergence, weighting, token_weights, num_items)
    student = "student_hidden" if form == "linear" else "student_logits"
    common = dict(divergence=divergence, reduction=reduction, weighting=weighting, backend=backend,
                  return_stats=True, temperature=0.8, **options, **(extra or {}))
    if form == "linear":
        ws = d["ws"].clone().requires_grad_(True)
        common["student_weight"] = ws
    full = rows[student].clone().requires_grad_(True)
    # the single-process reference: the torch backend (the Triton one has no prefix_confidence in its fused op)
    # (no positions: the weights' positions are counted among the valid tokens, with a group as here)
    ref_loss, ref_stats = fn(**{**rows, student: full}, **per_token, **{**common, "backend": "torch"})
    upstream = torch.rand(S, L, generator=_gen(seed + 1), dtype=ref_loss.dtype)
    (ref_loss * upstream).sum().backward() if reduction == "none" else ref_loss.backward()
    ref_grad = full.grad.reshape(S * L, -1)
    ref_wgrad = None if form != "linear" else ws.grad.clone()
    mine = _split(_gen(seed + 2), S * L, world)[rank]
    if shift:  # each sequence's positions start elsewhere, below 0 too (a prompt at negative positions)
        d["positions"] = d["positions"] + torch.randint(-5 * (not bounded), 6, (S, 1), generator=_gen(seed + 3))
    bounds = dict(sequence_bounds=(S + 2, L + 6)) if bounded else {}

    def local(x):
        return None if x is None else x.reshape(S * L, *x.shape[2:])[mine]

    if inference:  # forward only, under inference mode: the same loss
        with torch.inference_mode():
            loss = fn(**{**{k: local(v) for k, v in rows.items()}}, **{k: local(v) for k, v in per_token.items()},
                      positions=local(d["positions"]), sequence_ids=local(d["sequence_ids"]), sequence_group=group,
                      **{**common, "return_stats": False}, **bounds)
        if reduction == "none":
            _close(loss, local(ref_loss).detach(), "inference-mode rows", dtype)
        else:
            _close(_sum_over_ranks(loss.clone(), group), ref_loss.detach(), "inference-mode loss", dtype)
        return

    x = local(rows[student]).clone().requires_grad_(True)
    local_rows = {k: local(v) for k, v in rows.items()}
    local_rows[student] = x
    local_tokens = {k: local(v) for k, v in per_token.items()}
    if form == "linear":
        ws.grad = None
    if use_module:
        module = wpkl.WeightedKLLoss(weighting=weighting, divergence=divergence, reduction=reduction,
                                     backend=backend, temperature=0.8, sequence_group=group)
        loss, stats = module(**local_rows, **local_tokens, positions=local(d["positions"]),
                             sequence_ids=local(d["sequence_ids"]), return_stats=True, **options, **bounds)
    else:
        loss, stats = fn(**local_rows, **local_tokens, positions=local(d["positions"]),
                         sequence_ids=local(d["sequence_ids"]), sequence_group=group, **common, **bounds)
    if reduction == "none":
        _close(loss, local(ref_loss), "loss rows", dtype)
        (loss * local(upstream)).sum().backward()
    else:
        _close(_sum_over_ranks(loss, group), ref_loss.detach(), "sum of the ranks' losses", dtype)
        loss.backward()
    _close(x.grad, ref_grad[mine], "gradient rows", dtype)
    if ref_wgrad is not None:
        _close(_sum_over_ranks(ws.grad, group), ref_wgrad, "lm_head gradient (summed over the ranks)", dtype)
    for name in ("divergence", "weight", "teacher_confidence", "position"):
        _close(getattr(stats, name), local(getattr(ref_stats, name)), f"stats.{name}", dtype)
    assert torch.equal(stats.mask, local(ref_stats.mask))


def layout_case(rank, world, group, *, seed, layout="megatron_bshd", weighting=None, reduction="mean",
                bounded=False):
    """A trainer's layout (wpkl.distributed): the rank's slice from the helper, against the whole batch
    (``bounded``: with the helper's ``bounds`` as ``sequence_bounds``)."""
    import wpkl
    from wpkl import distributed as wd

    g = _gen(seed)
    S, V = 3, 7
    L = 4 * world  # a multiple of 2 * cp
    d = _batch(g, S=S, L=L, V=V)
    full = d["s"].clone().requires_grad_(True)
    kw = dict(weighting=weighting, reduction=reduction, backend="torch")
    if layout == "megatron_bshd":
        ref = wpkl.weighted_kl_loss(full, d["t"], mask=d["mask"], tokens=d["tokens"], **kw)
        ref.backward()
        part = wd.megatron_bshd(S, L, world, rank)
        whole = dict(s=full.detach(), t=d["t"], mask=d["mask"], tokens=d["tokens"])
        ref_grad = full.grad
    else:  # packed: the valid prefix of each row, cu_seqlens
        lengths = d["mask"].flip(-1).cummax(-1).values.flip(-1).sum(-1).clamp_min(1)  # up to the last valid token
        keep = torch.arange(L) < lengths.unsqueeze(1)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        pos = torch.arange(L).expand(S, L)[keep]
        ref = wpkl.weighted_kl_loss(full[keep], d["t"][keep], mask=d["mask"][keep], positions=pos,
                                    sequence_ids=d["sequence_ids"][keep], tokens=d["tokens"][keep], **kw)
        ref.backward()
        part = (wd.megatron_thd if layout == "megatron_thd" else wd.contiguous)(cu, world, rank)
        whole = dict(s=full.detach()[keep], t=d["t"][keep], mask=d["mask"][keep], tokens=d["tokens"][keep])
        ref_grad = full.grad[keep]
    x = part.take(whole["s"]).clone().requires_grad_(True)
    loss = wpkl.weighted_kl_loss(x, part.take(whole["t"]), mask=part.take(whole["mask"], False) & part.valid,
                                 positions=part.positions, sequence_ids=part.sequence_ids, sequence_group=group,
                                 tokens=part.take(whole["tokens"]), **kw,
                                 **(dict(sequence_bounds=part.bounds) if bounded else {}))
    _close(_sum_over_ranks(loss, group), ref.detach(), f"{layout}: the ranks' losses")
    loss.backward()
    _close(x.grad[part.valid], part.take(ref_grad)[part.valid], f"{layout}: gradient rows")
    assert (x.grad[~part.valid] == 0).all()
    # the helpers' slices reassemble the whole batch: every index once over the ranks
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([part.index.numel()]), group=group)
    gathered = [torch.empty(int(n), dtype=torch.long) for n in sizes]
    dist.all_gather(gathered, part.index.reshape(-1).contiguous(), group=group)
    every = torch.cat(gathered)
    total = whole["s"].shape[0] * (whole["s"].shape[1] if layout == "megatron_bshd" else 1)
    assert sorted(every[every >= 0].tolist()) == list(range(total)), layout


def mesh_case(rank, world, group, *, seed, backend="torch", divergence="reverse_kl", weighting=None, bounded=False):
    """A tensor x context mesh (world 4: 2 x 2; other worlds skip it): vocabulary shards over one group, sequence
    shards over the other, against one process on the whole batch and vocabulary."""
    import torch.distributed as dist

    import wpkl

    if world != 4:
        return
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    sp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp_rank, sp_rank = rank % 2, rank // 2
    tp_group, sp_group = tp_groups[rank // 2], sp_groups[rank % 2]
    g = _gen(seed)
    d = _batch(g, V=10, dtype=torch.float32)
    S, L = d["mask"].shape
    full = d["s"].clone().requires_grad_(True)
    kw = dict(divergence=divergence, weighting=weighting, backend=backend, temperature=0.8, tokens=d["tokens"])
    ref = wpkl.weighted_kl_loss(full, d["t"], mask=d["mask"], **kw)
    ref.backward()
    mine = _split(_gen(seed + 2), S * L, 2)[sp_rank]
    bounds = dict(sequence_bounds=(S, L)) if bounded else {}

    def local(x):
        return x.reshape(S * L, *x.shape[2:])[mine]

    vocab = slice(5 * tp_rank, 5 * tp_rank + 5)
    x = local(d["s"])[:, vocab].clone().requires_grad_(True)
    loss = wpkl.weighted_kl_loss(x, local(d["t"])[:, vocab].contiguous(), mask=local(d["mask"]),
                                 positions=local(d["positions"]), sequence_ids=local(d["sequence_ids"]),
                                 process_group=tp_group, sequence_group=sp_group,
                                 **{**kw, "tokens": local(d["tokens"])}, **bounds)
    _close(_sum_over_ranks(loss, sp_group), ref.detach(), "the mesh's loss", torch.float32)
    loss.backward()
    _close(x.grad, full.grad.reshape(S * L, -1)[mine][:, vocab], "the mesh's gradient block", torch.float32)
    # one tensor-parallel rank shifting its sequence ids: every rank of the mesh raises (none returns a loss)
    try:
        wpkl.weighted_kl_loss(x.detach(), local(d["t"])[:, vocab].contiguous(), mask=local(d["mask"]),
                              positions=local(d["positions"]), process_group=tp_group, sequence_group=sp_group,
                              sequence_ids=local(d["sequence_ids"]) + (1 if rank == 1 else 0),
                              **{**kw, "tokens": local(d["tokens"])}, **bounds)
    except ValueError:
        pass
    else:
        raise AssertionError("shifted sequence ids on one tensor-parallel rank: no error on this rank")


def collectives_case(rank, world, group, *, seed, bounded=False):
    """An all-gather (the agreement) and an all-reduce (the layout) per call, or with ``sequence_bounds`` the
    all-reduce alone; nothing else, none in backward."""
    import torch.distributed as dist

    import wpkl

    calls = []
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "all_gather_into_tensor",
                                                        "broadcast", "reduce_scatter_tensor")}

    def recorder(name):
        def record(*args, **kwargs):
            calls.append(name)
            return originals[name](*args, **kwargs)
        return record

    d = _batch(_gen(seed))
    S, L = d["mask"].shape
    mine = _split(_gen(seed + 2), S * L, world)[rank]

    def local(x):
        return x.reshape(S * L, *x.shape[2:])[mine]

    x = local(d["s"]).clone().requires_grad_(True)
    for name in originals:
        setattr(dist, name, recorder(name))
    try:
        loss = wpkl.weighted_kl_loss(x, local(d["t"]), mask=local(d["mask"]), positions=local(d["positions"]),
                                     sequence_ids=local(d["sequence_ids"]), sequence_group=group, backend="torch",
                                     weighting=wpkl.Weighting(accumulated=0.5, normalize=True),
                                     **(dict(sequence_bounds=(S, L)) if bounded else {}))
        forward = list(calls)
        loss.backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert forward == (["all_reduce"] if bounded else ["all_gather", "all_reduce"]), forward
    assert calls == forward, calls  # nothing in backward


def good_cases():
    import wpkl

    cases, seed = [], 1000
    divergences = ("reverse_kl", "forward_kl", "jsd", "sampled")
    reductions = ("mean", "sum", "seq_mean", "none")
    weightings = _weightings()
    for i, divergence in enumerate(divergences):
        for j, reduction in enumerate(reductions):
            for k, weighting in enumerate(weightings):
                if (i + j + k) % 2:
                    continue  # half the grid: every divergence x reduction and every weighting appears
                seed += 1
                cases.append((f"logits {divergence} {reduction} w{k}", split_case,
                              dict(seed=seed, divergence=divergence, reduction=reduction, weighting=weighting,
                                   token_weights=(k % 3 == 0))))
    for k, weighting in enumerate(weightings):
        seed += 1
        cases.append((f"topk w{k}", split_case, dict(seed=seed, form="topk", divergence="forward_kl",
                                                     weighting=None if k == 5 else weighting,
                                                     reduction=reductions[k % 4])))
        seed += 1
        cases.append((f"linear w{k}", split_case, dict(seed=seed, form="linear", weighting=weighting,
                                                       divergence=divergences[k % 4], reduction=reductions[k % 4])))
        seed += 1
        w = None if weighting is not None and weighting.confidence else weighting
        cases.append((f"sampled logprobs w{k}", split_case, dict(seed=seed, form="sampled_logprobs",
                                                                 divergence="sampled", weighting=w)))
    for reduction in ("mean", "none"):
        seed += 1
        cases.append((f"num_items {reduction}", split_case,
                      dict(seed=seed, num_items=37.0 if reduction == "mean" else None, reduction=reduction,
                           weighting=weightings[3])))
    seed += 1
    cases.append(("module", split_case, dict(seed=seed, use_module=True, weighting=weightings[5])))
    for k in (1, 2, 5, 6):  # positions offset per sequence (negative too): the weights count valid tokens
        seed += 1
        cases.append((f"shifted positions w{k}", split_case, dict(seed=seed, shift=True, weighting=weightings[k],
                                                                  reduction=reductions[k % 4])))
    for reduction in reductions:
        seed += 1
        cases.append((f"inference mode {reduction}", split_case, dict(seed=seed, inference=True, reduction=reduction,
                                                                      weighting=weightings[3])))
    seed += 1
    cases.append(("linear inference mode", split_case, dict(seed=seed, form="linear", inference=True,
                                                            weighting=weightings[3])))
    for form, k in (("logits", 3), ("logits", 5), ("topk", 1), ("linear", 4)):
        seed += 1
        weighting = weightings[k]
        cases.append((f"triton {form} w{k}", split_case, dict(seed=seed, form=form, backend="triton", dtype=torch.float32,
                                                         weighting=weighting,
                                                         divergence="forward_kl" if form == "topk" else "reverse_kl")))
    for layout in ("megatron_bshd", "megatron_thd", "contiguous"):
        for k in (3, 5):
            seed += 1
            cases.append((f"layout {layout} w{k}", layout_case, dict(seed=seed, layout=layout,
                                                                     weighting=weightings[k])))
    seed += 1
    cases.append(("mesh torch", mesh_case, dict(seed=seed, weighting=weightings[3])))
    cases.append(("mesh triton", mesh_case, dict(seed=seed + 1, backend="triton", weighting=weightings[1])))
    cases.append(("mesh triton bounded", mesh_case, dict(seed=seed + 4, backend="triton", weighting=weightings[3],
                                                         bounded=True)))
    cases.append(("collectives", collectives_case, dict(seed=seed + 2)))
    cases.append(("collectives bounded", collectives_case, dict(seed=seed + 2, bounded=True)))
    cases.append(("deferred agreement", deferred_case, dict(seed=seed + 2)))
    # sequence_bounds (no host sync): the same results, whatever the split
    bounded = [("logits w3", dict(weighting=weightings[3], reduction="seq_mean")),
               ("logits jsd w5", dict(weighting=weightings[5], divergence="jsd", token_weights=True)),
               ("logits sampled none w6", dict(weighting=weightings[6], divergence="sampled", reduction="none")),
               ("num_items", dict(weighting=weightings[4], num_items=37.0)),
               ("shifted positions", dict(weighting=weightings[2], shift=True, reduction="sum")),
               ("topk w1", dict(form="topk", divergence="forward_kl", weighting=weightings[1])),
               ("linear w4", dict(form="linear", weighting=weightings[4], divergence="forward_kl")),
               ("module", dict(use_module=True, weighting=weightings[5])),
               ("inference mode", dict(inference=True, weighting=weightings[3])),
               ("triton w3", dict(backend="triton", dtype=torch.float32, weighting=weightings[3])),
               ("tip", dict(weighting=wpkl.Weighting(token_importance=wpkl.TokenImportance(0.4))))]
    for name, options in bounded:
        seed += 1
        cases.append((f"bounded {name}", split_case, dict(seed=seed + 3, bounded=True, **options)))
    for layout in ("megatron_bshd", "megatron_thd", "contiguous"):
        seed += 1
        cases.append((f"bounded layout {layout}", layout_case, dict(seed=seed + 3, layout=layout, bounded=True,
                                                                    weighting=weightings[3])))
    # the OPD variants (tests/test_variants.py): TIP's batch-wide selection and PW-OPSD's schedule need the whole
    # batch; PowerOPD changes the terms only
    tip = wpkl.Weighting(token_importance=wpkl.TokenImportance(0.4))
    pw = wpkl.Weighting(position=wpkl.PositionSigmoid(), normalize=False)
    variants = [("tip logits", dict(weighting=tip)), ("tip sampled none", dict(weighting=tip, divergence="sampled",
                                                                                reduction="none")),
                ("tip linear", dict(weighting=tip, form="linear", reduction="seq_mean")),
                ("tip topk", dict(weighting=tip, form="topk", divergence="forward_kl")),
                ("tip triton", dict(weighting=tip, backend="triton", dtype=torch.float32, reduction="sum")),
                ("pw-opsd seq_mean", dict(weighting=pw, reduction="seq_mean", divergence="forward_kl")),
                ("pw-opsd triton", dict(weighting=pw, backend="triton", dtype=torch.float32)),
                ("powered sampled", dict(divergence="sampled", extra=dict(sampled_power=5.0),
                                         weighting=weightings[3])),
                ("powered linear", dict(divergence="sampled", form="linear", extra=dict(sampled_power=2.0))),
                ("powered triton", dict(divergence="sampled", backend="triton", dtype=torch.float32,
                                        extra=dict(sampled_power=5.0))),
                # the Triton backend on the other forms
                ("tip linear triton", dict(weighting=tip, form="linear", backend="triton", dtype=torch.float32)),
                ("tip topk triton", dict(weighting=tip, form="topk", divergence="forward_kl", backend="triton",
                                         dtype=torch.float32)),
                ("pw-opsd topk triton", dict(weighting=pw, form="topk", divergence="forward_kl", backend="triton",
                                             dtype=torch.float32, reduction="seq_mean")),
                ("pw-opsd linear triton", dict(weighting=pw, form="linear", divergence="forward_kl", backend="triton",
                                               dtype=torch.float32, reduction="seq_mean")),
                ("powered linear triton", dict(divergence="sampled", form="linear", backend="triton",
                                               dtype=torch.float32, extra=dict(sampled_power=5.0)))]
    for name, options in variants:
        seed += 1
        cases.append((name, split_case, dict(seed=seed + 3, **options)))
    assert wpkl  # imported for the weightings
    return cases


# ------------------------------------------------------------------------------------------------ bad inputs

def bad_input_cases(rank, world, group, bounded=False) -> dict:
    """Each bad input must raise a ValueError on every rank (naming the problem on the rank that has it); after
    each, a good call checks that the ranks are still in step. ``bounded``: the calls pass ``sequence_bounds``
    (one collective, no host read: on the CPU every rank still raises at once; CUDA defers, below)."""
    import wpkl

    d = _batch(_gen(7))
    S, L = d["mask"].shape
    parts = _split(_gen(8), S * L, world)
    bounds = dict(sequence_bounds=(S, L)) if bounded else {}

    def local(x, idx=None):
        return x.reshape(S * L, *x.shape[2:])[parts[rank] if idx is None else idx]

    def call(idx=None, **changes):
        kw = dict(mask=local(d["mask"], idx), positions=local(d["positions"], idx),
                  sequence_ids=local(d["sequence_ids"], idx), sequence_group=group, backend="torch",
                  weighting=wpkl.Weighting(accumulated=0.5), **bounds)
        kw.update(changes)
        return wpkl.weighted_kl_loss(local(d["s"], idx), local(d["t"], idx), **kw)

    dropper = next(r for r in range(world) if len(parts[r]))  # a rank that drops a token leaves a gap
    cases = {
        "duplicate": (lambda: call(idx=torch.cat([parts[rank], parts[dropper][:1]]) if rank == world - 1 else None),
                      "claim the same"),
        "gap": (lambda: call(idx=parts[rank][1:] if rank == dropper else None), "gap"),
        "no positions": (lambda: call(positions=None), "needs positions"),
        "packed without ids": (lambda: call(sequence_ids=None), "needs sequence_ids"),
        "bad option one rank": (lambda: call(divergence="nope" if rank == 1 else "reverse_kl"), None),
        "options differ": (lambda: call(temperature=0.5 if rank == 0 else 1.0), None),
        "ids shifted on one rank": (lambda: call(sequence_ids=local(d["sequence_ids"]) + (1 if rank == 1 else 0)),
                                    None),
        "negative id": (lambda: call(sequence_ids=local(d["sequence_ids"]) - (S if rank == 0 else 0)), None),
        "num_items differs": (lambda: call(num_items_in_batch=10.0 + rank), "num_items_in_batch"),
        # a module whose forward rejects return_stats on one rank (its spec joins the call's agreement)
        "module return_stats one rank": (lambda: wpkl.WeightedKLLoss(sequence_group=group, backend="torch")(
            local(d["s"]), local(d["t"]), mask=local(d["mask"]), positions=local(d["positions"]),
            sequence_ids=local(d["sequence_ids"]), return_stats="yes" if rank == 0 else False, **bounds), None),
    }
    if bounded:
        cases.update({
            "position beyond the bounds": (lambda: call(positions=local(d["positions"]) + (L if rank == 0 else 0)),
                                           None),
            "id beyond the bounds": (lambda: call(sequence_bounds=(S - 1, L)), "sequence_bounds"),
            "bounds not ints": (lambda: call(sequence_bounds=(S, 2.5)), "sequence_bounds"),
            "bad shape one rank": (lambda: call(mask=torch.cat([local(d["mask"]), torch.ones(int(rank == 1),
                                                                                              dtype=torch.bool)])),
                                   None),
        })
    results = {}
    prefix = "bad bounded: " if bounded else "bad: "
    for name, (bad, words) in cases.items():
        key = prefix + name
        try:
            bad()
            results[key] = "no error"
        except (ValueError, TypeError) as e:  # (a TypeError: the rank whose own argument has the wrong type)
            results[key] = None if words is None or words in str(e) or "rank(s)" in str(e) else f"message: {e}"
        except Exception:  # noqa: BLE001
            results[key] = traceback.format_exc(limit=4)
        try:
            call()  # the ranks are still in step
        except Exception:  # noqa: BLE001
            results[key] = (results[key] or "") + " | then a good call failed: " + traceback.format_exc(limit=4)
    return results


def deferred_case(rank, world, group, *, seed):
    """With ``sequence_bounds`` on CUDA the agreement is checked without a host read: forced here (the checks'
    CUDA branch on gloo; the Triton route, the one without host syncs). A rank whose inputs are rejected raises at once; the others return and raise at
    ``wpkl.check_errors()`` (not at their next call: the ranks' flags arrive at their own times); a bad layout
    (a duplicate place) raises there on every rank; no host sync."""
    import test_host_sync as hs

    import wpkl
    import wpkl.inputs.checks as checks

    d = _batch(_gen(seed), dtype=torch.float32)
    S, L = d["mask"].shape
    parts = _split(_gen(seed + 1), S * L, world)
    x = d["s"].reshape(S * L, -1)

    def call(idx=None, **changes):
        idx = parts[rank] if idx is None else idx
        kw = dict(mask=d["mask"].reshape(-1)[idx], positions=d["positions"].reshape(-1)[idx],
                  sequence_ids=d["sequence_ids"].reshape(-1)[idx], sequence_group=group, backend="triton",
                  weighting=wpkl.Weighting(accumulated=0.5), sequence_bounds=(S, L))
        kw.update(changes)
        return wpkl.weighted_kl_loss(x[idx], d["t"].reshape(S * L, -1)[idx], **kw)

    saved = (checks._deferred, checks._pinned, torch.cuda.Event)
    checks._deferred = lambda flags: True
    checks._pinned = lambda shape, dtype: torch.empty(shape, dtype=dtype)
    torch.cuda.Event = hs._FakeEvent
    syncs, originals = [], {name: getattr(torch.Tensor, name) for name in hs.SYNCS}

    def spy(name):
        def record(self, *args, **kwargs):
            if hs._from_wpkl(2) and sys._getframe(1).f_code.co_name != "_raise_from":
                syncs.append(name)
            return originals[name](self, *args, **kwargs)
        return record

    try:
        checks._pending.clear()
        for name in hs.SYNCS:
            setattr(torch.Tensor, name, spy(name))
        good = call()
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        assert syncs == [], syncs
        wpkl.check_errors()  # nothing pending is wrong
        ref = wpkl.weighted_kl_loss(x, d["t"].reshape(S * L, -1), mask=d["mask"].reshape(-1),
                                    positions=d["positions"].reshape(-1), sequence_ids=d["sequence_ids"].reshape(-1),
                                    weighting=wpkl.Weighting(accumulated=0.5), backend="torch")
        _close(_sum_over_ranks(good, group), ref, "deferred agreement: the ranks' losses", torch.float32)
        # one rank's mask of the wrong shape: it raises now, the others at check_errors
        try:
            call(mask=torch.cat([d["mask"].reshape(-1)[parts[rank]], torch.ones(int(rank == 1), dtype=torch.bool)]))
            raised_now = False
        except ValueError:
            raised_now = True
        assert raised_now == (rank == 1), (rank, raised_now)
        # the next good call, before any check_errors: every rank returns the right loss (an earlier call's
        # failure is held for check_errors, not raised by one rank mid-call, which would reject this call too)
        _close(_sum_over_ranks(call(), group), ref, "the good call after a rejected rank", torch.float32)
        if rank != 1:
            try:
                wpkl.check_errors()
                raise AssertionError("a rejected rank: no deferred error on this rank")
            except wpkl.DeferredCheckError as e:
                assert "rejected their inputs" in str(e), e
        # a bad value on one rank (a negative token weight: a deferred value check there, no host error): it
        # travels in the agreement, so every rank raises at check_errors (rank 1 its own message)
        weights = torch.ones(len(parts[rank]))
        bad = bool(d["mask"].reshape(-1)[parts[1]].any())  # rank 1 has a valid token to give a bad weight
        if rank == 1 and bad:
            weights[d["mask"].reshape(-1)[parts[1]].nonzero()[0]] = -1.0
        call(token_weights=weights)
        expected = [] if not bad else ["token_weights", "rejected"] if rank == 1 else ["rejected"]
        for words in expected:  # (rank 1: its value check's message, then the agreement's: none is lost)
            try:
                wpkl.check_errors()
                raise AssertionError(f"a bad value on rank 1: no deferred error ({words}) on this rank")
            except wpkl.DeferredCheckError as e:
                assert words in str(e), e
        wpkl.check_errors()
        # a duplicate place: every rank's error waits for check_errors
        donor = next(r for r in range(world) if len(parts[r]))
        call(idx=torch.cat([parts[rank], parts[donor][:1]]) if rank == world - 1 else None)
        try:
            wpkl.check_errors()
            raise AssertionError("a duplicate place: no deferred error")
        except wpkl.DeferredCheckError as e:
            assert "claim the same" in str(e), e
        call()  # in step
        wpkl.check_errors()
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        checks._deferred, checks._pinned, torch.cuda.Event = saved
        checks._pending.clear()


# ------------------------------------------------------------------------------------------ the process group

def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    results, timings = {}, {}
    for name, function, kwargs in good_cases():
        start = time.perf_counter()
        try:
            function(rank, world, group, **kwargs)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per case
            results[name] = traceback.format_exc(limit=6)
        timings[name] = time.perf_counter() - start
        dist.barrier(group=group)
    results.update(bad_input_cases(rank, world, group))
    results.update(bad_input_cases(rank, world, group, bounded=True))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(dict(results=results, timings=timings), f)
    dist.destroy_process_group()
    leave_worker()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    # one world at a time: 4 ranks already fill 2 cores
    return spawn_worlds(_worker, {world: str(tmp_path_factory.mktemp(f"sp{world}")) for world in WORLD_SIZES},
                        SPAWN_TIMEOUT_S, at_once=False)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_every_split_matches_one_process(worlds, world):
    ran = [n for n in worlds[world][0]["results"] if not n.startswith(("bad: ", "bad bounded: "))]
    assert ran == [name for name, _, _ in good_cases()]
    assert_ranks_passed(worlds[world], skip_prefix="bad")


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_bad_inputs_raise_on_every_rank(worlds, world):
    assert_bad_inputs_raised(worlds[world], 10)
    for rank, result in enumerate(worlds[world]):  # with sequence_bounds: the same, and its own four
        bad = {k: v for k, v in result["results"].items() if k.startswith("bad bounded: ")}
        assert len(bad) == 14 and all(v is None for v in bad.values()), (rank, bad)


# ------------------------------------------------------------------------------------------ one process

def test_sequence_ids_without_a_group_lay_out_a_shuffled_packed_batch():
    """Without a group, sequence_ids place shuffled packed tokens whose positions do not restart at 0."""
    import wpkl

    d = _batch(_gen(3))
    S, L = d["mask"].shape
    for weighting in _weightings():
        full = d["s"].clone().requires_grad_(True)
        ref = wpkl.weighted_kl_loss(full, d["t"], mask=d["mask"], weighting=weighting,
                                    teacher_token_logprobs=d["teacher_logprobs"], reduction="seq_mean")
        ref.backward()
        perm = torch.randperm(S * L, generator=_gen(4))
        flat = {k: d[k].reshape(S * L, *d[k].shape[2:])[perm] for k in ("s", "t", "mask", "positions",
                                                                         "sequence_ids", "teacher_logprobs")}
        shift = 100  # positions from 100 on: they place the tokens, the weights count the valid ones
        x = flat["s"].clone().requires_grad_(True)
        out = wpkl.weighted_kl_loss(x, flat["t"], mask=flat["mask"], positions=flat["positions"] + shift,
                                    sequence_ids=flat["sequence_ids"], weighting=weighting, reduction="seq_mean",
                                    teacher_token_logprobs=flat["teacher_logprobs"])
        out.backward()
        _close(out, ref.detach(), f"loss {weighting}")
        _close(x.grad, full.grad.reshape(S * L, -1)[perm], f"grad {weighting}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sequence_ids_with_stats_on_a_two_dimensional_batch(backend, reduction):
    """sequence_ids on a [B, T] batch with return_stats: the stats (and a "none" loss) come back in the batch's
    shape, the same values as the flattened batch's (the layout's [1, N] tokens are the [B, T] ones flattened)."""
    import wpkl

    d = _batch(_gen(6))
    S, L = d["mask"].shape
    names = ("s", "t", "mask", "positions", "sequence_ids", "teacher_logprobs")
    results = []
    for shape in ((S, L), (S * L,)):
        kw = {k: d[k].reshape(*shape, *d[k].shape[2:]) for k in names}
        kw["teacher_token_logprobs"] = kw.pop("teacher_logprobs")
        if backend == "triton":
            kw["s"], kw["t"] = kw["s"].float(), kw["t"].float()
        x = kw.pop("s").clone().requires_grad_(True)
        loss, stats = wpkl.weighted_kl_loss(x, kw.pop("t"), **kw, weighting=wpkl.Weighting(accumulated=0.5),
                                            reduction=reduction, return_stats=True, backend=backend)
        loss.sum().backward()
        assert stats.weight.shape == stats.divergence.shape == shape
        results.append((loss.reshape(-1), x.grad.reshape(S * L, -1),
                        *(getattr(stats, n).reshape(-1) for n in ("divergence", "weight", "position"))))
    for batch, flat in zip(*results, strict=True):
        _close(batch, flat, "two-dimensional batch", batch.dtype)


def test_sequence_ids_errors():
    import wpkl

    d = _batch(_gen(5))
    s, t = d["s"].reshape(-1, 9), d["t"].reshape(-1, 9)
    pos, ids = d["positions"].reshape(-1), d["sequence_ids"].reshape(-1)
    with pytest.raises(ValueError, match="claim the same"):
        wpkl.weighted_kl_loss(s, t, positions=pos * 0, sequence_ids=ids)
    with pytest.raises(ValueError, match="gap"):
        wpkl.weighted_kl_loss(s, t, positions=pos * 2, sequence_ids=ids)
    with pytest.raises(ValueError, match="needs positions"):
        wpkl.weighted_kl_loss(s, t, sequence_ids=ids)
    with pytest.raises(ValueError, match="sequence_ids must be >= 0"):
        wpkl.weighted_kl_loss(s, t, positions=pos, sequence_ids=ids - 1)
    with pytest.raises(ValueError, match="sequence_group needs torch.distributed"):
        wpkl.weighted_kl_loss(s, t, positions=pos, sequence_ids=ids, sequence_group=object())


def test_layouts_reassemble_the_batch():
    """Every helper's slices, over the ranks, hold every token of the whole batch once, at its position, and
    every (sequence, position) place once."""
    from wpkl import distributed as wd

    cu = torch.tensor([0, 5, 6, 19, 19, 30])
    lengths = (cu[1:] - cu[:-1]).tolist()
    for size in (1, 2, 3, 4):
        for name, parts in (("thd", [wd.megatron_thd(cu, size, r) for r in range(size)]),
                            ("contiguous", [wd.contiguous(cu, size, r) for r in range(size)]),
                            ("bshd", [wd.megatron_bshd(3, 8 * size, size, r) for r in range(size)])):
            index = torch.cat([p.index.reshape(-1) for p in parts])
            total = 3 * 8 * size if name == "bshd" else 30
            assert sorted(index[index >= 0].tolist()) == list(range(total)), (name, size)
            places = {(int(i), int(p)) for part in parts for i, p in zip(part.sequence_ids.reshape(-1),
                                                                         part.positions.reshape(-1), strict=True)}
            assert len(places) == index.numel(), (name, size)  # each place once
            if name != "bshd":
                real = torch.cat([p.index.reshape(-1) for p in parts]) >= 0
                ids = torch.cat([p.sequence_ids.reshape(-1) for p in parts])[real]
                pos = torch.cat([p.positions.reshape(-1) for p in parts])[real]
                idx = index[real]
                assert (cu[ids] + pos == idx).all() and all(pos[ids == s].max() < n for s, n in enumerate(lengths)
                                                             if n), (name, size)
            assert len({p.bounds for p in parts}) == 1, (name, size)  # every rank's bounds the same, and bounding
            S_, L_ = parts[0].bounds
            assert all(int(p.sequence_ids.max()) < S_ and int(p.positions.max()) < L_ and int(p.positions.min()) >= 0
                       for p in parts if p.index.numel()), (name, size)
            assert L_ == {"bshd": 8 * size, "thd": max(-(-n // (2 * size)) * 2 * size for n in lengths),
                          "contiguous": max(lengths)}[name], (name, size)
            sizes = {p.index.numel() for p in parts}
            assert len(sizes) == 1, (name, size, sizes)  # the trainers' layouts give every rank as many tokens
    # tensor parallelism too (verl, Megatron-Bridge: each sequence padded to tp * cp * 2): a length of 10 at
    # cp = 2, tp = 2 pads to 16, rank 0 holding chunks 0 and 3 of 4
    assert wd.megatron_thd([0, 10], 2, 0, pad_multiple=8).positions.tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert wd.megatron_thd([0, 10], 2, 0).positions.tolist() == [0, 1, 2, 9, 10, 11]
    with pytest.raises(ValueError, match="pad_multiple"):
        wd.megatron_thd([0, 10], 2, 0, pad_multiple=6)
    with pytest.raises(ValueError, match="multiple of 2"):
        wd.megatron_bshd(2, 6, 2, 0)
    with pytest.raises(ValueError, match="rank"):
        wd.contiguous(cu, 2, 2)


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        if mine:
            dist.destroy_process_group()


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_one_host_sync_and_detached_stats(one_rank_group, monkeypatch, packed, bounded):
    """The Triton route with a sequence group reads the host once (the agreement's table), or with
    ``sequence_bounds`` never, with the value and layout checks deferred as on CUDA; the stats hold no graph."""
    import test_host_sync as hs

    import wpkl

    calls = []
    hs.install_spies(monkeypatch, calls)
    d = _batch(_gen(11), dtype=torch.float32)
    S, L = d["mask"].shape
    args = {k: d[k] for k in ("s", "t", "mask", "positions", "sequence_ids")}
    if packed:
        args = {k: v.reshape(S * L, *v.shape[2:]) for k, v in args.items()}
    x = args["s"].clone().requires_grad_(True)
    wpkl.inputs.checks._pending.clear()
    loss, stats = wpkl.weighted_kl_loss(x, args["t"], mask=args["mask"], positions=args["positions"],
                                        sequence_ids=args["sequence_ids"], sequence_group=one_rank_group,
                                        backend="triton", return_stats=True,
                                        weighting=wpkl.Weighting(accumulated=0.5, normalize=True),
                                        sequence_bounds=(S, L) if bounded else None,
                                        num_items_in_batch=7.0)  # (a number: a fill, no host-to-device copy)
    loss.backward()
    assert len(wpkl.inputs.checks._pending) >= 2  # (the value and the layout checks ran, deferred)
    wpkl.inputs.checks._pending.clear()
    assert calls == ([] if bounded else ["cpu", "tolist"]), calls
    assert not any(t.requires_grad for t in (stats.weight, stats.divergence, stats.position))
    ref = wpkl.weighted_kl_loss(args["s"], args["t"], mask=args["mask"], positions=args["positions"],
                                sequence_ids=args["sequence_ids"], backend="torch",
                                weighting=wpkl.Weighting(accumulated=0.5, normalize=True), num_items_in_batch=7.0)
    _close(loss, ref, "one rank", torch.float32)
