"""Several logits teachers on vocabulary shards (wpkl/parallel/shard_mixture.py): each rank's kernels read its
slice of the student once per launch of up to four teachers, and one merge of every teacher's statistics (two
all-reduces) follows, whatever the number of teachers. In spawned gloo worlds, against the float64 reference on
the whole vocabulary: dtypes, odd slices (a slice of 1, primes), -inf padding, masks (a fully masked row, tokens
a teacher is not weighed on), temperatures, both KLs, stats, weights that read the teachers; launches and merges
counted; ranks that split their teachers into different launches (a local fact) agree on the collectives; ranks
that disagree on a teacher, or on the plan, all raise.
"""

from __future__ import annotations

import json
import os
import traceback

import pytest
import torch

from utils import assert_ranks_passed, leave_worker, poison_new_buffers, spawn_worlds

B, T = 2, 5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(world, local_vocab, seed=7, K=6, pad=0):
    """The whole vocabulary's float64 student and K teachers ([B, T, world * local_vocab]; the last ``pad``
    columns -inf in all of them: a padded vocabulary), a mask with a fully masked row and a soft mixing tensor
    with zeros (the tokens a teacher is not weighed on)."""
    g = _gen(seed)
    V = world * local_vocab
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teachers = [student + (0.4 + k % 3) * torch.randn(B, T, V, generator=g, dtype=torch.float64) for k in range(K)]
    if pad:
        for x in [student, *teachers]:
            x[..., V - pad:] = float("-inf")
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0, 0], mask[1] = True, False
    mixing = torch.rand(K, B, T, generator=g, dtype=torch.float64) * (torch.rand(K, B, T, generator=g) < 0.7)
    return student, teachers, mask, mixing


def _counting():
    """Counts, in this process: the forward launches (the mixture kernel's teacher counts, the single kernel's)
    and the merges of the sharded mixture."""
    import wpkl.parallel.shard_mixture as module
    from wpkl.backends.triton_mixture import TritonMixturePass
    from wpkl.backends.triton_pass import TritonPass

    calls = {"mixture": [], "single": 0, "merges": 0}
    mixture, single, merge = TritonMixturePass.forward, TritonPass.forward, module.merge_kernel_stats

    def counted_mixture(student, teachers, valids, spec, **kwargs):
        calls["mixture"].append(len(teachers))
        return mixture(student, teachers, valids, spec, **kwargs)

    def counted_single(*args, **kwargs):
        calls["single"] += 1
        return single(*args, **kwargs)

    def counted_merge(*args, **kwargs):
        calls["merges"] += 1
        return merge(*args, **kwargs)

    TritonMixturePass.forward = staticmethod(counted_mixture)
    TritonPass.forward = staticmethod(counted_single)
    module.merge_kernel_stats = counted_merge

    def undo():
        TritonMixturePass.forward, TritonPass.forward = staticmethod(mixture), staticmethod(single)
        module.merge_kernel_stats = merge

    return calls, undo


def _sharded_and_whole(rank, group, world, local_vocab, dtypes, divergence, temperature, pad=0, teacher_of=None,
                       mixing_of=None):
    """The sharded call on this rank's slice (its teachers in ``dtypes``; ``teacher_of(k, slice)`` may replace
    one) and the float64 reference on the whole vocabulary: (loss, grad, stats) of each."""
    import wpkl

    student, teachers, mask, mixing = _problem(world, local_vocab, K=len(dtypes), pad=pad)
    if mixing_of is not None:
        mixing = mixing_of(mixing)
    sl = slice(rank * local_vocab, (rank + 1) * local_vocab)
    low = student.float()
    x = low[..., sl].clone().requires_grad_(True)
    mine = [t[..., sl].to(d) for t, d in zip(teachers, dtypes, strict=True)]
    if teacher_of is not None:
        mine = [teacher_of(k, t) for k, t in enumerate(mine)]
    options = dict(mask=mask, divergence=divergence, temperature=temperature, weighting=wpkl.Weighting(accumulated=0.5),
                   return_stats=True)
    loss, stats = wpkl.multi_teacher_loss(x, teachers=mine, mixing=mixing.float(), process_group=group,
                                          backend="triton", **options)
    loss.backward()
    y = low.double().clone().requires_grad_(True)
    whole, whole_stats = wpkl.multi_teacher_loss(y, teachers=[t.to(d).double() for t, d in zip(teachers, dtypes, strict=True)],
                                                 mixing=mixing, backend="reference", **options)
    whole.backward()
    return (loss, x.grad, stats), (whole, y.grad[..., sl], whole_stats)


def _assert_matches(ours, truth, loose):
    (loss, grad, stats), (whole, whole_grad, whole_stats) = ours, truth
    tol = dict(rtol=2e-2, atol=2e-3) if loose else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), whole, **tol)
    torch.testing.assert_close(grad.double(), whole_grad, **tol)
    for name in ("divergence", "teacher_confidence", "student_entropy", "teacher_entropy", "weight"):
        torch.testing.assert_close(getattr(stats, name).double(), getattr(whole_stats, name).double(), **tol,
                                   equal_nan=True)


def _world_case(rank, world, group):
    import wpkl

    results = {}

    def case(name, fn):
        try:
            fn()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported to the parent test
            results[name] = traceback.format_exc()

    def matches(dtype, divergence, local_vocab, temperature, pad):
        # five teachers of the dtype (a launch of four, one alone) and one of another (alone): three launches,
        # one merge
        other = torch.float32 if dtype != torch.float32 else torch.bfloat16
        calls, undo = _counting()
        try:
            ours, truth = _sharded_and_whole(rank, group, world, local_vocab, [dtype] * 5 + [other], divergence,
                                             temperature, pad)
        finally:
            undo()
        assert calls == {"mixture": [4], "single": 2, "merges": 1}, calls
        _assert_matches(ours, truth, loose=dtype != torch.float32)

    for dtype, local_vocab, temperature, pad in ((torch.float32, 37, 1.0, 3), (torch.bfloat16, 23, 0.7, 0),
                                                 (torch.float16, 1, 1.0, 1)):
        for divergence in ("reverse_kl", "forward_kl"):
            case(f"{divergence} {dtype} V_local={local_vocab}",
                 lambda d=dtype, v=divergence, n=local_vocab, t=temperature, p=pad: matches(d, v, n, t, p))

    def launches_differ():
        # on rank 0 teacher 1 lies between two elements (torch.frombuffer at a byte offset): the kernels cannot
        # address it from teacher 0's pointer, so rank 0 launches (0, 2, 3) and (1,), the others (0, 1, 2, 3); the
        # collectives are the same, and so is the result
        def teacher_of(k, t):
            if rank != 0 or k != 1:
                return t
            raw = bytearray(1) + bytearray(t.contiguous().numpy().tobytes())
            return torch.frombuffer(raw, dtype=torch.float32, offset=1).view(t.shape)

        calls, undo = _counting()
        try:
            ours, truth = _sharded_and_whole(rank, group, world, 11, [torch.float32] * 4, "reverse_kl", 1.0,
                                             teacher_of=teacher_of)
        finally:
            undo()
        expected = {"mixture": [3], "single": 1, "merges": 1} if rank == 0 else \
            {"mixture": [4], "single": 0, "merges": 1}
        assert calls == expected, calls
        _assert_matches(ours, truth, loose=False)

    case("ranks launch differently, one merge", launches_differ)

    def fused_linear(divergence, K):
        # K hidden-state teachers on the rank's lm_head rows: each chunk's student logits projected once for them,
        # one merge per chunk (five: a launch of four and one alone, whose backward writes the gradient over the
        # chunk's logits last); the hidden states' gradient summed over the group, the weight's and the bias's
        # this rank's rows
        g = _gen(31)
        H, Ht, local_vocab, chunk = 6, 5, 9, 4
        V = world * local_vocab
        h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, T, H), (V, H), (V,)))
        heads = [(torch.randn(B, T, Ht, generator=g, dtype=torch.float64), torch.randn(V, Ht, generator=g,
                                                                                      dtype=torch.float64))
                 for _ in range(K)]
        _, _, mask, mixing = _problem(world, local_vocab, K=K)
        sl = slice(rank * local_vocab, (rank + 1) * local_vocab)
        options = dict(mixing=[0.1 * (k + 1) for k in range(K)], mask=mask, divergence=divergence, temperature=0.8,
                       student_logit_scale=0.7, weighting=wpkl.Weighting(accumulated=0.5), fused_linear=True)
        x = [h.float().requires_grad_(True), w[sl].float().requires_grad_(True), b[sl].float().requires_grad_(True)]
        calls, undo = _counting()
        try:
            loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=[dict(teacher_hidden=t.float(),
                                                                      teacher_weight=tw[sl].float())
                                                                 for t, tw in heads],
                                           student_bias=x[2], process_group=group, backend="triton",
                                           chunk_size=chunk, **options)
            loss.backward()
        finally:
            undo()
        chunks = -(-int(mask.sum()) // chunk)
        launches = [min(K, 4)] * chunks
        assert calls == {"mixture": launches, "single": chunks * (K > 4), "merges": chunks}, calls
        y = [t.clone().requires_grad_(True) for t in (h, w, b)]
        whole = wpkl.multi_teacher_loss(y[0], y[1], teachers=[dict(teacher_hidden=t, teacher_weight=tw)
                                                              for t, tw in heads],
                                        student_bias=y[2], backend="reference", **options)
        whole.backward()
        torch.testing.assert_close(loss.double(), whole, rtol=1e-5, atol=1e-6)
        for got, truth in zip(x, (y[0].grad, y[1].grad[sl], y[2].grad[sl]), strict=True):
            torch.testing.assert_close(got.grad.double(), truth, rtol=2e-4, atol=2e-6)

    for divergence, K in (("reverse_kl", 3), ("forward_kl", 5)):
        case(f"fused-linear {divergence} K={K}", lambda d=divergence, k=K: fused_linear(d, k))

    def sampled(power, fused):
        # the sampled-token loss: two logits teachers (float32, bfloat16) and a server's log q(y), a mixing tensor
        # with zeros, the rollout's log p(y), PowerOPD's power, a temperature: one student pass, one merge per form
        # of teacher; fused-linear: two hidden-state teachers and a log q(y) one, one pass per chunk
        import wpkl.backends.triton_topk as triton_topk

        g = _gen(41)
        local_vocab, H, chunk = 8, 6, 4
        V = world * local_vocab
        _, _, mask, mixing = _problem(world, local_vocab, K=3)
        tokens = torch.randint(0, V, (B, T), generator=g)
        rollout = -torch.rand(B, T, generator=g, dtype=torch.float64)
        sl = slice(rank * local_vocab, (rank + 1) * local_vocab)
        if fused:
            h, w = torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g,
                                                                                       dtype=torch.float64)
            heads = [(torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g,
                                                                                        dtype=torch.float64))
                     for _ in range(2)]
            full = [(th @ tw.T) for th, tw in heads]
            student64 = h @ w.T
        else:
            student64 = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
            full = [student64 + torch.randn(B, T, V, generator=g, dtype=torch.float64) for _ in range(2)]
        log_q = torch.log_softmax(full[0] + 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64) / 0.8,
                                  -1).gather(-1, tokens[..., None])[..., 0]
        options = dict(mask=mask, tokens=tokens, divergence="sampled", temperature=0.8, sampled_power=power,
                       weighting=wpkl.Weighting(accumulated=0.5), fused_linear=fused)
        calls, undo = _counting()
        passes, student_pass = [], triton_topk.student_pass
        triton_topk.student_pass = lambda *args: passes.append(1) or student_pass(*args)
        try:
            if fused:
                x = [h.float().requires_grad_(True), w[sl].float().requires_grad_(True)]
                teachers = [dict(teacher_hidden=th.float(), teacher_weight=tw[sl].float()) for th, tw in heads]
                loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=teachers + [dict(teacher_logprobs=log_q.float())],
                                               mixing=[0.5, 0.3, 0.2], rollout_logprobs=rollout.float(),
                                               process_group=group, backend="triton", chunk_size=chunk, **options)
            else:
                x = [student64[..., sl].float().requires_grad_(True)]
                teachers = [full[0][..., sl].float(), full[1][..., sl].bfloat16(),
                            dict(teacher_logits=None, teacher_logprobs=log_q.float())]
                loss = wpkl.multi_teacher_loss(x[0], teachers=teachers, mixing=mixing.float(),
                                               rollout_logprobs=rollout.float(), process_group=group,
                                               backend="triton", **options)
            loss.backward()
        finally:
            undo()
            triton_topk.student_pass = student_pass
        chunks = -(-int(mask.sum()) // chunk) if fused else 1
        assert calls == {"mixture": [], "single": 0, "merges": 2 * chunks} and len(passes) == chunks, (calls, passes)
        if fused:
            y = [h.clone().requires_grad_(True), w.clone().requires_grad_(True)]
            whole = wpkl.multi_teacher_loss(y[0], y[1], teachers=[dict(teacher_hidden=th, teacher_weight=tw)
                                                                  for th, tw in heads]
                                            + [dict(teacher_logprobs=log_q.float().double())],
                                            mixing=[0.5, 0.3, 0.2], rollout_logprobs=rollout.float().double(),
                                            backend="reference", **options)
            truths = (y[0], y[1])
        else:
            y = [student64.float().double().requires_grad_(True)]
            whole = wpkl.multi_teacher_loss(y[0], teachers=[full[0].float().double(), full[1].bfloat16().double(),
                                                            dict(teacher_logits=None,
                                                                 teacher_logprobs=log_q.float().double())],
                                            mixing=mixing.float().double(), rollout_logprobs=rollout.float().double(),
                                            backend="reference", **options)
            truths = (y[0],)
        whole.backward()
        torch.testing.assert_close(loss.double(), whole, rtol=1e-5, atol=1e-5)
        for n, (got, truth) in enumerate(zip(x, truths, strict=True)):
            # (the hidden states' gradient whole, the lm_head's this rank's rows, the logits' this rank's columns)
            expected = (truth.grad if n == 0 else truth.grad[sl]) if fused else truth.grad[..., sl]
            torch.testing.assert_close(got.grad.double(), expected, rtol=2e-4, atol=2e-5)

    for power in (None, 5.0):
        for fused in (False, True):
            case(f"sampled power={power} fused-linear={fused}", lambda p=power, f=fused: sampled(p, f))

    def empty(form):
        # no tokens: every rank still makes the pass's merges (the same collectives), loss 0, a zero-size gradient
        import wpkl.parallel.shard_mixture as module

        merges, merge = [], module.merge_kernel_stats
        module.merge_kernel_stats = lambda *args, **kwargs: merges.append(1) or merge(*args, **kwargs)
        try:
            if form == "fused-linear":
                h, w = torch.randn(2, 0, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
                teachers = [dict(teacher_hidden=torch.randn(2, 0, 3), teacher_weight=torch.randn(5, 3))] * 2
                loss = wpkl.multi_teacher_loss(h, w, teachers=teachers, fused_linear=True, process_group=group,
                                               backend="triton", reduction="sum")
                leaves = (h, w)
            else:
                x = torch.randn(2, 0, 5, requires_grad=True)
                options = dict(divergence="sampled", tokens=torch.zeros(2, 0, dtype=torch.int64)) \
                    if form == "sampled" else {}
                teachers = [torch.randn(2, 0, 5), torch.randn(2, 0, 5)] + (
                    [dict(teacher_logits=None, teacher_logprobs=torch.zeros(2, 0))] if form == "sampled" else [])
                loss = wpkl.multi_teacher_loss(x, teachers=teachers, process_group=group, backend="triton",
                                               reduction="sum", **options)
                leaves = (x,)
            loss.backward()
        finally:
            module.merge_kernel_stats = merge
        assert loss.item() == 0.0 and all(leaf.grad is not None and leaf.grad.abs().sum() == 0 for leaf in leaves)
        assert len(merges) == (2 if form == "sampled" else 1 if form == "logits" else 0), merges

    for form in ("logits", "sampled", "fused-linear"):
        case(f"no tokens: {form}", lambda f=form: empty(f))

    def sampled_routing():
        # a one-hot mixing tensor on the host: the sampled-token teachers still share (no teacher's work per element)
        _, teachers, mask, _ = _problem(world, 6, K=3)
        student = _problem(world, 6, K=3)[0]
        tokens = torch.randint(0, 6 * world, (B, T), generator=_gen(5))
        routing = torch.nn.functional.one_hot(torch.randint(0, 3, (B, T), generator=_gen(6)), 3).permute(2, 0, 1)
        sl = slice(rank * 6, rank * 6 + 6)
        options = dict(mask=mask, tokens=tokens, divergence="sampled", mixing=routing.float())
        calls, undo = _counting()
        try:
            loss = wpkl.multi_teacher_loss(student[..., sl].float(), teachers=[t[..., sl].float() for t in teachers],
                                           process_group=group, backend="triton", **options)
        finally:
            undo()
        whole = wpkl.multi_teacher_loss(student.float(), teachers=[t.float() for t in teachers], backend="torch",
                                        **options)
        assert calls["merges"] == 1, calls
        torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-6)

    case("sampled routing shares", sampled_routing)

    def passes_of(options, teachers=None, mixing=None, K=3):
        """The launches and merges of a sharded call (the float32 reference on the whole vocabulary checks
        its value)."""
        student, all_teachers, mask, soft = _problem(world, 7, K=K)
        sl = slice(rank * 7, rank * 7 + 7)
        mine = [t[..., sl].float() for t in all_teachers] if teachers is None else teachers(sl, all_teachers)
        whole_teachers = [t.float() for t in all_teachers] if teachers is None else teachers(slice(None), all_teachers)
        mixing = soft.float() if mixing is None else mixing
        calls, undo = _counting()
        try:
            loss = wpkl.multi_teacher_loss(student[..., sl].float(), teachers=mine, mixing=mixing, mask=mask,
                                           process_group=group, backend="triton", **options)
        finally:
            undo()
        whole = wpkl.multi_teacher_loss(student.float(), teachers=whole_teachers, mixing=mixing, mask=mask,
                                        backend="torch", **options)
        torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-6)
        return calls

    def topk(sl, teachers):  # the logits teachers share; the top-k teacher runs its own sharded kernels
        values, ids = torch.log_softmax(teachers[2], -1).float().topk(3, -1)
        return [teachers[0][..., sl].float(), teachers[1][..., sl].float(),
                dict(teacher_topk_ids=ids, teacher_topk_logprobs=values)]

    routing = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).T.float()
    for name, options, teachers, mixing, expected in (
            ("jsd: a launch of two, one alone, one merge", dict(divergence="jsd"), None, None,
             {"mixture": [2], "single": 1, "merges": 1}),
            ("a top-k teacher alone", {}, topk, None, {"mixture": [2], "single": 0, "merges": 1}),
            ("a routing: each teacher its own pass", {}, None, routing, {"mixture": [], "single": 3, "merges": 0}),
            ("numbers share", {}, None, [0.5, 0.2, 0.3], {"mixture": [3], "single": 0, "merges": 1})):
        def check(options=options, teachers=teachers, mixing=mixing, expected=expected):
            calls = passes_of(options, teachers, mixing)
            assert calls == expected, calls
        case(name, check)

    def disagreeing(name, mine, own=None, mixing_of=None):
        """Rank 1's teachers (or mixing) differ from the others' as ``mine(teachers)`` (``mixing_of(mixing)``)
        makes them: every rank raises a ValueError naming ``name`` (rank 1: ``own`` where given; none waits in a
        collective)."""
        student, teachers, mask, mixing = _problem(world, 7, K=3)
        sl = slice(rank * 7, rank * 7 + 7)
        local = [t[..., sl].float() for t in teachers]
        if rank == 1:
            local = mine(local, teachers)
            mixing = mixing if mixing_of is None else mixing_of(mixing)
        try:
            wpkl.multi_teacher_loss(student[..., sl].float(), teachers=local, mixing=mixing.float(), mask=mask,
                                    process_group=group, backend="triton")
        except ValueError as e:
            expected = own if own is not None and rank == 1 else name
            assert expected in str(e), str(e)
        else:
            raise AssertionError("no error")

    def as_topk(local, teachers):
        values, ids = torch.log_softmax(teachers[2], -1).float().topk(3, -1)
        return [*local[:2], dict(teacher_topk_ids=ids, teacher_topk_logprobs=values)]

    case("bad: a teacher's dtype differs", lambda: disagreeing(
        "teachers", lambda local, _: [local[0], local[1].bfloat16(), local[2]]))
    case("bad: a teacher's form differs", lambda: disagreeing("teachers", as_topk))
    case("bad: a teacher's slice is not the student's", lambda: disagreeing(
        "rejected", lambda local, _: [local[0], torch.cat([local[1], local[1][..., :1]], -1), local[2]],
        own="same vocabulary slice"))
    case("bad: the mixing differs", lambda: disagreeing(
        "disagree", lambda local, _: local, mixing_of=lambda m: torch.nn.functional.one_hot(
            m.argmax(0), 3).permute(2, 0, 1).double()))
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
def test_teachers_on_vocabulary_shards_share_one_merge(world, tmp_path):
    results = spawn_worlds(_worker, {world: str(tmp_path)}, timeout_s=400)[world]
    assert_ranks_passed(results)
    assert all(len(r["results"]) == 6 + 1 + 2 + 4 + 3 + 1 + 4 + 4 for r in results), [sorted(r["results"])
                                                                                      for r in results]
