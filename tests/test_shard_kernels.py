"""Top-k and jsd teachers on vocabulary shards with the Triton kernels. Top-k (wpkl/parallel/shard_topk.py): each
rank's student pass on its slice, one merge of the student's statistics, one gather of the atoms' logits from the
ranks that hold them, the atom math alike on every rank, and a backward with no collective. jsd
(wpkl/parallel/merge.py: ShardedTritonPass): the slice's normalizers merged, jsd's second pass on the slice with
them, one all-reduce of its four sums. In spawned gloo worlds (2 and 3 ranks), against the float64 reference on
the whole vocabulary: fp32/bf16/fp16, every top-k mode and divergence, jsd's beta, slices of 1 and of primes, -inf
vocabulary padding, a slice the student bans whole, a temperature, a fully masked row, a token whose atoms all lie
on one rank, an empty list, IW-OPD weights, the stats, close distributions; the fused-linear form (eager and
two-phase); several teachers (numbers, a soft tensor, a routing; top-k: one student pass, one merge and one gather
for all); a logits teacher beside them; collectives counted; no tokens; ranks that disagree raise on every rank.
Buffers start as NaN.
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch

from utils import assert_grad_close, assert_ranks_passed, leave_worker, poison_new_buffers, spawn_worlds

B, T = 3, 5
f64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _topk(log_q, K, local_vocab, g):
    """A server's top-K answer from full-vocabulary log-probs [B, T, V] (float32), shuffled, with: a short list,
    an empty one (all -1) and a token whose atoms all lie in rank 0's slice."""
    V = log_q.shape[-1]
    K = min(K, V)
    values, ids = log_q.topk(K, dim=-1)
    ids, values = ids.clone(), values.clone()
    if K > 1:
        ids[0, 3, K // 2:], values[0, 3, K // 2:] = -1, float("-inf")
    ids[1, 1], values[1, 1] = -1, float("-inf")
    own = min(K, local_vocab)  # token (0, 1): only rank 0 holds its atoms
    first = log_q[0, 1, :local_vocab].topk(own)
    ids[0, 1], values[0, 1] = -1, float("-inf")
    ids[0, 1, :own], values[0, 1, :own] = first.indices, first.values
    perm = torch.argsort(torch.rand(ids.shape, generator=g), dim=-1)
    return ids.gather(-1, perm), values.gather(-1, perm).float()


def _problem(world, local_vocab, seed, pad=0, teachers=1, K=6):
    g = _gen(seed)
    V = world * local_vocab
    student = torch.randn(B, T, V, generator=g, dtype=f64) * 2
    lists = []
    for k in range(teachers):
        teacher = student + (0.5 + k) * torch.randn(B, T, V, generator=g, dtype=f64)
        if pad:
            teacher[..., V - pad:] = float("-inf")
        lists.append(_topk(torch.log_softmax(teacher, -1), K + k, local_vocab, g))
    if pad:
        student[..., V - pad:] = float("-inf")
    mask = torch.rand(B, T, generator=g) < 0.85
    mask[0, :4], mask[1, 1], mask[2] = True, True, False
    return student, lists, mask


def _recording():
    """The VocabShard objects made in this process (their ``calls`` count the collectives), and an undo."""
    import wpkl.parallel.vocab as vocab

    shards, original = [], vocab.VocabShard.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        shards.append(self)

    vocab.VocabShard.__init__ = recording

    def undo():
        vocab.VocabShard.__init__ = original

    return shards, undo


def _spy(owner, name, calls):
    original = getattr(owner, name)
    setattr(owner, name, staticmethod(lambda *a, **k: calls.append(name) or original(*a, **k)))
    return lambda: setattr(owner, name, staticmethod(original))


def matches_reference(loss, x, leaves, columns, loose, whole_of):
    """A sharded call's loss and its leaves' gradients (``x``: the student's logits slice, or the hidden states and
    this rank's weight rows) against ``whole_of(*leaves)``, the float64 reference on the whole vocabulary."""
    y = [t.clone().requires_grad_(True) for t in leaves]
    whole = whole_of(*y)
    whole.backward()
    truths = (y[0].grad, y[1].grad[columns]) if len(y) == 2 else (y[0].grad[..., columns],)
    tol = dict(rtol=2e-2, atol=2e-3) if loose else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), whole, **tol)
    for got, truth in zip(x, truths, strict=True):
        torch.testing.assert_close(got.grad.double(), truth, **(tol if loose else dict(rtol=2e-4, atol=2e-6)))


def _world_case(rank, world, group):
    import wpkl
    from wpkl.backends.torch_pass import TorchPass
    from wpkl.parallel.shard_topk import ShardedTritonTopKPass

    results = {}

    def case(name, fn):
        try:
            fn()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()

    def single(dtype, mode, divergence, beta, local_vocab, temperature, pad):
        student, ((ids, values),), mask = _problem(world, local_vocab, seed=local_vocab + 3, pad=pad)
        sl = slice(rank * local_vocab, (rank + 1) * local_vocab)
        options = dict(mask=mask, divergence=divergence, beta=beta, temperature=temperature, topk_mode=mode,
                       teacher_topk_ids=ids, teacher_topk_logprobs=values, return_stats=True,
                       weighting=wpkl.Weighting(accumulated=0.5))
        if mode == "raw":
            options.update(topk_logprob_floor=-4.0, topk_loss_max=2.0)
        low = student.to(dtype)
        upstream = torch.rand(B, T, generator=_gen(3), dtype=f64) + 0.5
        x = low[..., sl].clone().requires_grad_(True)
        calls, shards, undo_shards = [], *_recording()
        undo = [_spy(ShardedTritonTopKPass, "forward", calls), _spy(TorchPass, "forward", calls), undo_shards]
        try:
            loss, stats = wpkl.weighted_kl_loss(x, None, process_group=group, backend="triton", reduction="none",
                                                **options)
            forward_calls = shards[-1].calls
            (loss * upstream.to(loss.dtype)).sum().backward()
        finally:
            for u in undo:
                u()
        assert calls == ["forward"], calls  # the sharded kernels, not the torch pass
        assert forward_calls == 3 and shards[-1].calls == 3, (forward_calls, shards[-1].calls)  # none backward
        assert bool(torch.isfinite(x.grad).all()), "a gradient element left unwritten (NaN poison)"

        def whole(logits, backend):
            y = logits.clone().requires_grad_(True)
            opts = dict(options, teacher_topk_logprobs=values.to(logits.dtype) if logits.dtype == f64 else values)
            out, st = wpkl.weighted_kl_loss(y, None, backend=backend, reduction="none", **opts)
            (out * upstream.to(out.dtype)).sum().backward()
            return out, st, y.grad[..., sl]

        truth, truth_stats, truth_grad = whole(low.double(), "reference")
        same_grad = whole(low.float(), "reference")[2].to(dtype)
        tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(loss.double(), truth, **tol)
        for name in ("divergence", "weight", "teacher_confidence", "student_entropy", "teacher_entropy"):
            torch.testing.assert_close(getattr(stats, name).double(), getattr(truth_stats, name).double(), **tol,
                                       equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
        assert_grad_close(x.grad, truth_grad, same_grad, dtype)

    for dtype, mode, divergence, beta, local_vocab, temperature, pad in (
            (torch.float32, "tail", "forward_kl", 0.5, 37, 1.0, 3),
            (torch.float32, "renormalize", "reverse_kl", 0.5, 11, 0.7, 0),
            (torch.float32, "raw", "jsd", 0.3, 13, 1.3, 0),
            (torch.bfloat16, "tail", "reverse_kl", 0.5, 23, 0.7, 0),
            (torch.bfloat16, "renormalize", "jsd", 0.5, 9, 1.0, 2),
            (torch.float16, "tail", "forward_kl", 0.5, 1, 1.0, 0),
            (torch.float16, "raw", "reverse_kl", 0.5, 7, 1.0, 0)):
        name = f"one teacher {mode} {divergence} {str(dtype)[6:]} V_local={local_vocab} T={temperature} pad={pad}"
        case(name, lambda a=(dtype, mode, divergence, beta, local_vocab, temperature, pad): single(*a))

    def fused_linear(reduction, softcap):
        # the fused-linear form: the rank's lm_head rows; eager (a scalar upstream) or two-phase (per-token)
        g = _gen(51)
        H, local_vocab, chunk = 6, 9, 4
        V = world * local_vocab
        h, w, b = (torch.randn(*shape, generator=g, dtype=f64) for shape in ((B, T, H), (V, H), (V,)))
        log_q = torch.log_softmax(h @ w.T + b + torch.randn(B, T, V, generator=g, dtype=f64), -1)
        ids, values = _topk(log_q, 5, local_vocab, g)
        mask = torch.rand(B, T, generator=g) < 0.8
        sl = slice(rank * local_vocab, (rank + 1) * local_vocab)
        options = dict(mask=mask, teacher_topk_ids=ids, teacher_topk_logprobs=values, reduction=reduction,
                       temperature=0.8, weighting=wpkl.Weighting(accumulated=0.5), student_softcap=softcap,
                       divergence="forward_kl")
        upstream = torch.rand(B, T, generator=g, dtype=f64) + 0.5
        x = [h.float().requires_grad_(True), w[sl].float().requires_grad_(True), b[sl].float().requires_grad_(True)]
        calls, shards, undo_shards = [], *_recording()
        undo = [_spy(ShardedTritonTopKPass, "forward", calls), undo_shards]
        try:
            loss = wpkl.fused_linear_kl_loss(x[0], x[1], None, None, student_bias=x[2], process_group=group,
                                             backend="triton", chunk_size=chunk, **options)
            (loss if reduction != "none" else loss * upstream.float()).sum().backward()
        finally:
            for u in undo:
                u()
        chunks = -(-int(mask.sum()) // chunk)
        assert calls == ["forward"] * chunks, calls
        assert shards[-1].calls == 3 * chunks + 1, shards[-1].calls  # and the hidden states' gradient
        y = [t.clone().requires_grad_(True) for t in (h, w, b)]
        whole = wpkl.fused_linear_kl_loss(y[0], y[1], None, None, student_bias=y[2], backend="reference",
                                          **dict(options, teacher_topk_logprobs=values.double()))
        (whole if reduction != "none" else whole * upstream).sum().backward()
        torch.testing.assert_close(loss.double(), whole, rtol=1e-5, atol=1e-6)
        for got, truth in zip(x, (y[0].grad, y[1].grad[sl], y[2].grad[sl]), strict=True):
            torch.testing.assert_close(got.grad.double(), truth, rtol=2e-4, atol=2e-6)

    for reduction, softcap in (("mean", None), ("none", 5.0)):
        case(f"fused-linear {reduction} softcap={softcap}", lambda r=reduction, c=softcap: fused_linear(r, c))

    def several(mixing_kind, fused, logits=0, dtype=torch.float32):
        # three top-k teachers (K = 4, 5, 6) of a soft mixing tensor with zeros, numbers or a routing: one student
        # pass, one merge, one gather of every teacher's atoms. Beside ``logits`` logits teachers (fused-linear:
        # hidden-state teachers) of ``dtype`` they join the first launch of those (the student read once: no
        # student pass, one student merge on their tokens) but for a routing; given first in the list, the
        # logits teachers last (the pass takes them first: the results come back in the caller's order)
        import wpkl.backends.triton_mixture as triton_mixture
        import wpkl.backends.triton_topk as triton_topk
        import wpkl.parallel.shard_topk as shard_topk

        local_vocab, H, chunk = 8, 6, 4
        V = world * local_vocab
        g = _gen(61)
        student, lists, mask = _problem(world, local_vocab, seed=62, teachers=3, K=4)
        if fused:
            h, w = torch.randn(B, T, H, generator=g, dtype=f64), torch.randn(V, H, generator=g, dtype=f64)
            heads = [(torch.randn(B, T, H, generator=g, dtype=f64), torch.randn(V, H, generator=g, dtype=f64))
                     for _ in range(logits)]
        K = 3 + logits
        mixing = {"soft": torch.rand(K, B, T, generator=g, dtype=f64) * (torch.rand(K, B, T, generator=g) < 0.7),
                  "numbers": [0.2, 0.5, 0.3, 0.4, 0.1, 0.3, 0.2, 0.6][:K],
                  "routing": torch.nn.functional.one_hot(torch.randint(0, K, (B, T), generator=g), K).permute(
                      2, 0, 1).to(f64)}[mixing_kind]
        sl = slice(rank * local_vocab, (rank + 1) * local_vocab)
        others = [student + (0.5 + k) * torch.randn(B, T, V, generator=g, dtype=f64) for k in range(logits)]

        def teachers_of(columns, to):
            top = [dict(teacher_topk_ids=i, teacher_topk_logprobs=to(q)) for i, q in lists]
            if fused:
                return top + [dict(teacher_hidden=to(th), teacher_weight=to(tw[columns])) for th, tw in heads]
            return top + [to(o.to(dtype))[..., columns] for o in others]

        options = dict(mask=mask, divergence="reverse_kl", temperature=0.9, weighting=wpkl.Weighting(accumulated=0.5),
                       fused_linear=fused)

        def float_mixing(m, dtype):
            return m.to(dtype) if isinstance(m, torch.Tensor) else m

        calls, passes, launched, shards, undo_shards = [], [], [], *_recording()
        student_pass, merge = triton_topk.student_pass, shard_topk.merge_kernel_stats
        mixture_forward = triton_mixture.TritonMixturePass.forward
        triton_topk.student_pass = lambda *a: passes.append("student") or student_pass(*a)
        shard_topk.merge_kernel_stats = lambda *a, **k: passes.append("merge") or merge(*a, **k)
        triton_mixture.TritonMixturePass.forward = staticmethod(
            lambda *a, rows=None: launched.append((len(a[1]), rows is not None)) or mixture_forward(*a, rows=rows))
        undo = [_spy(TorchPass, "forward", calls), undo_shards]
        try:
            if fused:
                x = [h.float().requires_grad_(True), w[sl].float().requires_grad_(True)]
                loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=teachers_of(sl, lambda t: t.float()),
                                               mixing=float_mixing(mixing, torch.float32), process_group=group,
                                               backend="triton", chunk_size=chunk, **options)
            else:
                x = [student[..., sl].float().requires_grad_(True)]
                loss = wpkl.multi_teacher_loss(x[0], teachers=teachers_of(sl, lambda t: t),
                                               mixing=float_mixing(mixing, torch.float32), process_group=group,
                                               backend="triton", **options)
            loss.backward()
        finally:
            triton_topk.student_pass, shard_topk.merge_kernel_stats = student_pass, merge
            triton_mixture.TritonMixturePass.forward = staticmethod(mixture_forward)
            for u in undo:
                u()
        chunks = -(-int(mask.sum()) // chunk) if fused else 1
        assert calls == [], calls
        joined = logits > 0 and mixing_kind != "routing"
        if joined:  # the first launch (of up to four) takes the top-k teachers' rows; a student merge, no student pass
            assert passes == ["merge"] * chunks and launched == [(min(logits, 4), True)] * chunks, (passes, launched)
        else:  # (a routing: each logits teacher its own single-teacher pass)
            assert passes == ["student", "merge"] * chunks and launched == [], (passes, launched)
        # collectives: the logits teachers' merge (2), the student's (2), the gather (1), per chunk; the hidden
        # states' gradient; a routing runs each logits teacher alone (2 each)
        expected = (5 if joined else 3 + 2 * logits) * chunks + (1 if fused else 0) if logits else 3 * chunks + fused
        assert shards[-1].calls == expected, (shards[-1].calls, expected)
        matches_reference(loss, x, [h, w] if fused else [student.float().double()], sl, dtype != torch.float32,
                          lambda *y: wpkl.multi_teacher_loss(*y, teachers=teachers_of(slice(None), lambda t: t.double()),
                                                             mixing=mixing, backend="reference", **options))

    for mixing_kind in ("soft", "numbers", "routing"):
        case(f"three teachers {mixing_kind}", lambda m=mixing_kind: several(m, False))
    case("three teachers fused-linear", lambda: several("numbers", True))
    for mixing_kind, logits, dtype in (("soft", 1, torch.float32), ("numbers", 2, torch.bfloat16),
                                       ("routing", 1, torch.float32), ("soft", 5, torch.float32)):
        case(f"three teachers and {logits} logits teacher(s) {mixing_kind} {str(dtype)[6:]}",
             lambda m=mixing_kind, n=logits, d=dtype: several(m, False, n, d))
    case("three teachers and 2 hidden-state teachers fused-linear", lambda: several("numbers", True, 2))

    def empty(teachers, logits=0):
        # no tokens: every rank makes the same collectives, loss 0, a zero gradient
        x = torch.randn(2, 0, 5, requires_grad=True)
        lists = [dict(teacher_topk_ids=torch.zeros(2, 0, 3, dtype=torch.int64),
                      teacher_topk_logprobs=torch.zeros(2, 0, 3))] * teachers + [torch.randn(2, 0, 5)] * logits
        shards, undo = _recording()
        try:
            if len(lists) == 1:
                loss = wpkl.weighted_kl_loss(x, None, process_group=group, backend="triton", reduction="sum",
                                             **lists[0])
            else:
                loss = wpkl.multi_teacher_loss(x, teachers=lists, process_group=group, backend="triton",
                                               reduction="sum")
            loss.backward()
        finally:
            undo()
        assert loss.item() == 0.0 and x.grad is not None and x.grad.shape == x.shape
        assert shards[-1].calls == (5 if logits else 3), shards[-1].calls

    for teachers, logits in ((1, 0), (2, 0), (2, 1)):
        case(f"no tokens: {teachers} top-k, {logits} logits teacher(s)", lambda n=teachers, m=logits: empty(n, m))

    def disagreeing(change, mine, others):
        # rank 1's top-k answer differs (an id past the vocabulary, or another id): every rank raises (rank 1:
        # ``mine``, the others ``others``), none waits in a collective
        student, ((ids, values),), mask = _problem(world, 7, seed=71)
        if rank == 1:
            ids = change(ids.clone())
        try:
            wpkl.weighted_kl_loss(student[..., rank * 7: rank * 7 + 7].float(), None, teacher_topk_ids=ids,
                                  teacher_topk_logprobs=values, mask=mask, process_group=group, backend="triton")
        except ValueError as e:
            assert (mine if rank == 1 else others) in str(e), str(e)
        else:
            raise AssertionError("no error")

    def past_vocabulary(ids):
        ids[0, 0, 0] = 7 * world
        return ids

    def another_id(ids):
        ids[0, 0, 0] = next(v for v in range(7 * world) if v not in ids[0, 0].tolist())
        return ids

    from wpkl.parallel.merge import ShardedTritonPass

    def jsd(dtype, beta, local_vocab, temperature, pad, banned, fused=False, close=False):
        # one jsd teacher: three collectives forward (the normalizers' two, the second pass's sums), none backward
        g = _gen(80 + local_vocab)
        V = world * local_vocab
        if fused:
            H = 6
            h, w = torch.randn(B, T, H, generator=g, dtype=f64), torch.randn(V, H, generator=g, dtype=f64)
            ht, wt = torch.randn(B, T, H, generator=g, dtype=f64), torch.randn(V, H, generator=g, dtype=f64)
        else:
            scale = 1e-3 if close else 1.0
            student = torch.randn(B, T, V, generator=g, dtype=f64) * (2 if not close else 1) + (40 if close else 0)
            teacher = student + scale * torch.randn(B, T, V, generator=g, dtype=f64)
            if pad:
                student[..., V - pad:] = float("-inf")
                teacher[..., V - pad:] = float("-inf")
            if banned:  # token (0, 2): the student bans the last rank's slice whole, the teacher does not
                student[0, 2, V - local_vocab:] = float("-inf")
        mask = torch.rand(B, T, generator=g) < 0.85
        mask[0, 2], mask[2] = True, False
        sl = slice(rank * local_vocab, (rank + 1) * local_vocab)
        options = dict(mask=mask, divergence="jsd", beta=beta, temperature=temperature,
                       weighting=None if close else wpkl.Weighting(accumulated=0.5))
        upstream = torch.rand(B, T, generator=g, dtype=f64) + 0.5
        calls, shards, undo_shards = [], *_recording()
        undo = [_spy(ShardedTritonPass, "forward", calls), _spy(TorchPass, "forward", calls), undo_shards]
        try:
            if fused:
                x = [h.float().requires_grad_(True), w[sl].float().requires_grad_(True)]
                loss = wpkl.fused_linear_kl_loss(x[0], x[1], ht.float(), wt[sl].float(), process_group=group,
                                                 backend="triton", chunk_size=4, **options)
                forward_calls = shards[-1].calls
                loss.backward()
            else:
                x = [student.to(dtype)[..., sl].clone().requires_grad_(True)]
                loss, stats = wpkl.weighted_kl_loss(x[0], teacher.to(dtype)[..., sl], process_group=group,
                                                    backend="triton", reduction="none", return_stats=True, **options)
                forward_calls = shards[-1].calls
                (loss * upstream.to(loss.dtype)).sum().backward()
        finally:
            for u in undo:
                u()
        chunks = -(-int(mask.sum()) // 4) if fused else 1
        assert calls == ["forward"] * chunks, calls
        assert forward_calls == 3 * chunks and shards[-1].calls == 3 * chunks + fused, (forward_calls, shards[-1].calls)
        if fused:
            y = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
            whole = wpkl.fused_linear_kl_loss(y[0], y[1], ht, wt, backend="reference", **options)
            whole.backward()
            torch.testing.assert_close(loss.double(), whole, rtol=1e-5, atol=1e-6)
            for got, truth in zip(x, (y[0].grad, y[1].grad[sl]), strict=True):
                torch.testing.assert_close(got.grad.double(), truth, rtol=2e-4, atol=2e-6)
            return

        def whole(logits, teacher_logits):
            y = logits.clone().requires_grad_(True)
            out, st = wpkl.weighted_kl_loss(y, teacher_logits, backend="reference", reduction="none",
                                            return_stats=True, **options)
            (out * upstream.to(out.dtype)).sum().backward()
            return out, st, y.grad[..., sl]

        low, low_teacher = student.to(dtype), teacher.to(dtype)
        truth, truth_stats, truth_grad = whole(low.double(), low_teacher.double())
        same_grad = whole(low.float(), low_teacher.float())[2].to(dtype)
        if close:
            # D ~ 1e-7 at logits around 40, where float32 logits (lse ~ 44, an ulp of 4e-6) leave the one-device
            # kernel's jsd itself a few times D off: the sharded one within twice its error, loss and gradient
            y = low.clone().requires_grad_(True)
            one = wpkl.weighted_kl_loss(y, low_teacher, backend="triton", reduction="none", **options)
            (one * upstream.to(one.dtype)).sum().backward()
            for got, theirs, exact in ((loss, one, truth), (x[0].grad, y.grad[..., sl], truth_grad)):
                ours, bar = (got.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
                assert ours <= 2 * bar + 1e-12, (ours.item(), bar.item(), exact.abs().max().item())
            return
        else:
            tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(loss.double(), truth, **tol)
            for name in ("divergence", "weight", "teacher_confidence", "student_entropy", "teacher_entropy"):
                torch.testing.assert_close(getattr(stats, name).double(), getattr(truth_stats, name).double(),
                                           **tol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
        assert_grad_close(x[0].grad, truth_grad, same_grad, dtype)

    for dtype, beta, local_vocab, temperature, pad, banned in (
            (torch.float32, 0.5, 37, 1.0, 3, True), (torch.float32, 0.3, 11, 0.7, 0, False),
            (torch.bfloat16, 0.8, 23, 1.3, 0, True), (torch.float16, 0.5, 1, 1.0, 0, False),
            (torch.float16, 0.2, 7, 1.0, 2, False)):
        name = f"jsd beta={beta} {str(dtype)[6:]} V_local={local_vocab} T={temperature} pad={pad} banned={banned}"
        case(name, lambda a=(dtype, beta, local_vocab, temperature, pad, banned): jsd(*a))
    case("jsd close distributions", lambda: jsd(torch.float32, 0.5, 13, 1.0, 0, False, close=True))
    case("jsd fused-linear", lambda: jsd(torch.float32, 0.4, 9, 0.8, 0, False, fused=True))

    def one_sided(divergence, side, teachers):
        # token (0, 2): ``side`` ("student" or "teacher") is -inf on the last rank's whole slice, the other side not
        # (a top-k filtered teacher, a banned slice): forward KL and jsd stay finite there (the merged lse gap must
        # count the student's mass on a slice the teacher has none of), a KL over the empty side is infinite
        g = _gen(97)
        local_vocab = 6
        V = world * local_vocab
        student = torch.randn(B, T, V, generator=g, dtype=f64) * 2
        logits = [student + (0.5 + k) * torch.randn(B, T, V, generator=g, dtype=f64) for k in range(teachers)]
        for x in ([student] if side == "student" else logits[:1]):
            x[0, 2, V - local_vocab:] = float("-inf")
        sl = slice(rank * local_vocab, (rank + 1) * local_vocab)

        def both(mask):
            options = dict(mask=mask, divergence=divergence, beta=0.4, reduction="none")
            x = student[..., sl].float().requires_grad_(True)
            if teachers == 1:
                loss = wpkl.weighted_kl_loss(x, logits[0][..., sl].float(), process_group=group, backend="triton",
                                             **options)
            else:
                loss = wpkl.multi_teacher_loss(x, teachers=[t[..., sl].float() for t in logits], process_group=group,
                                               backend="triton", **options)
            y = student.float().double().requires_grad_(True)
            if teachers == 1:
                whole = wpkl.weighted_kl_loss(y, logits[0].float().double(), backend="reference", **options)
            else:
                whole = wpkl.multi_teacher_loss(y, teachers=[t.float().double() for t in logits], backend="reference",
                                                **options)
            return x, loss, y, whole

        _, loss, _, whole = both(torch.ones(B, T, dtype=torch.bool))
        torch.testing.assert_close(loss.double(), whole, rtol=1e-5, atol=1e-6)  # (inf where the truth is inf)
        finite = torch.isfinite(whole.detach())
        assert bool(finite.all()) == (divergence != ("reverse_kl" if side == "teacher" else "forward_kl")), whole
        x, loss, y, whole = both(finite)  # the gradient of the finite rows (a masked row's is 0)
        loss.sum().backward()
        whole.sum().backward()
        torch.testing.assert_close(x.grad.double(), y.grad[..., sl], rtol=2e-4, atol=2e-6)

    for divergence in ("forward_kl", "jsd", "reverse_kl"):
        for side in ("teacher", "student"):
            for teachers in (1, 2):
                case(f"one-sided slice: {divergence}, {side} -inf, {teachers} teacher(s)",
                     lambda d=divergence, s=side, n=teachers: one_sided(d, s, n))

    def jsd_teachers(dtypes, mixing_kind, topk=0, fused=False):
        # several jsd teachers share: the first pass (as reverse KL) in launches of two, one merge, every launch's
        # second pass with the merged normalizers, one all-reduce of all their sums: three collectives per call
        # (chunk), whatever the number of teachers; top-k teachers beside them join the first launch (two more:
        # the student's merge; one: the gather); fused-linear: hidden-state teachers, a merge per chunk
        import wpkl.backends.triton_mixture as triton_mixture

        g = _gen(91)
        V, H, chunk = 2 * world * 5, 6, 4
        sl = slice(rank * 10, rank * 10 + 10)
        K = len(dtypes)
        student = torch.randn(B, T, V, generator=g, dtype=f64) * 2
        if fused:
            h, w = torch.randn(B, T, H, generator=g, dtype=f64), torch.randn(V, H, generator=g, dtype=f64)
            heads = [(torch.randn(B, T, H, generator=g, dtype=f64), torch.randn(V, H, generator=g, dtype=f64))
                     for _ in range(K)]
        logits = [student + (0.5 + k) * torch.randn(B, T, V, generator=g, dtype=f64) for k in range(K)]
        lists = [_topk(torch.log_softmax(student + torch.randn(B, T, V, generator=g, dtype=f64), -1), 4 + k, 10, g)
                 for k in range(topk)]
        mask = torch.rand(B, T, generator=g) < 0.8
        M = K + topk
        mixing = torch.rand(M, B, T, generator=g, dtype=f64) * (torch.rand(M, B, T, generator=g) < 0.7) \
            if mixing_kind == "soft" else [0.5, 0.3, 0.2, 0.4, 0.1][:M]

        def teachers_of(columns, to):
            if fused:
                mine = [dict(teacher_hidden=to(th), teacher_weight=to(tw[columns])) for th, tw in heads]
            else:
                mine = [to(t.to(d))[..., columns] for t, d in zip(logits, dtypes, strict=True)]
            return mine + [dict(teacher_topk_ids=i, teacher_topk_logprobs=to(q)) for i, q in lists]

        options = dict(mask=mask, divergence="jsd", beta=0.4, temperature=0.9, fused_linear=fused,
                       weighting=wpkl.Weighting(accumulated=0.5))
        launched, calls, shards, undo_shards = [], [], *_recording()
        mixture_forward = triton_mixture.TritonMixturePass.forward
        triton_mixture.TritonMixturePass.forward = staticmethod(
            lambda *a, rows=None: launched.append(len(a[1])) or mixture_forward(*a, rows=rows))
        undo = [_spy(TorchPass, "forward", calls), undo_shards]
        try:
            if fused:
                x = [h.float().requires_grad_(True), w[sl].float().requires_grad_(True)]
                loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=teachers_of(sl, lambda t: t.float()),
                                               mixing=mixing if isinstance(mixing, list) else mixing.float(),
                                               process_group=group, backend="triton", chunk_size=chunk, **options)
            else:
                x = [student[..., sl].float().requires_grad_(True)]
                loss = wpkl.multi_teacher_loss(x[0], teachers=teachers_of(sl, lambda t: t),
                                               mixing=mixing if isinstance(mixing, list) else mixing.float(),
                                               process_group=group, backend="triton", **options)
            loss.backward()
        finally:
            triton_mixture.TritonMixturePass.forward = staticmethod(mixture_forward)
            for u in undo:
                u()
        chunks = -(-int(mask.sum()) // chunk) if fused else 1
        assert calls == [], calls
        expected = (3 + (3 if topk else 0)) * chunks + fused
        assert shards[-1].calls == expected, (shards[-1].calls, expected)
        if not fused:  # launches of two of one dtype (a first launch of one still takes the top-k rows)
            assert launched == [2] * (dtypes.count(dtypes[0]) // 2) + ([1] if topk and K == 1 else []), launched
        matches_reference(loss, x, [h, w] if fused else [student.float().double()], sl, torch.bfloat16 in dtypes,
                          lambda *y: wpkl.multi_teacher_loss(*y, teachers=teachers_of(slice(None), lambda t: t.double()),
                                                             mixing=mixing, backend="reference", **options))

    f32, bf16 = torch.float32, torch.bfloat16
    for dtypes, mixing_kind, topk, fused in (([f32] * 3, "soft", 0, False), ([f32, f32, bf16], "numbers", 0, False),
                                             ([f32], "soft", 2, False), ([f32] * 2, "numbers", 2, False),
                                             ([f32] * 2, "numbers", 0, True)):
        name = f"jsd teachers {[str(d)[6:] for d in dtypes]} {mixing_kind} top-k={topk} fused-linear={fused}"
        case(name, lambda a=(dtypes, mixing_kind, topk, fused): jsd_teachers(*a))

    case("bad: an id past the vocabulary on one rank", lambda: disagreeing(past_vocabulary, "teacher_topk_ids must lie",
                                                                            "rejected their inputs"))
    case("bad: the ids differ on one rank", lambda: disagreeing(another_id, "disagree on the", "disagree on the"))
    return results


def _worker(rank, world, port, out_dir):
    os.environ.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        import wpkl.backends.launch

        wpkl.backends.launch.MAX_BLOCK_V = 16  # several blocks per slice (online rescaling, ragged tails)
        poison_new_buffers()
        results = _world_case(rank, world, torch.distributed.group.WORLD)
    except Exception:  # noqa: BLE001
        results = {"setup": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"results": results}, f)
    torch.distributed.barrier()
    leave_worker()


@pytest.mark.parametrize("world", (2, 3))
def test_topk_and_jsd_teachers_on_vocabulary_shards(world, tmp_path):
    results = spawn_worlds(_worker, {world: str(tmp_path)}, timeout_s=400)[world]
    assert_ranks_passed(results)
    assert all(len(r["results"]) == 7 + 2 + 9 + 3 + 5 + 2 + 12 + 5 + 2 for r in results), [sorted(r["results"]) for r in results]
