"""Several teachers' logits in one Triton pass (kernels/token_mixture.py, wpkl/backends/triton_mixture.py): the
student row read once for up to four teachers, forward and backward, as wpkl.multi_teacher_loss runs dense mixing.

The pass itself against the float64 reference, teacher by teacher (wpkl.reference's ``token_terms``; the gradient
against sum_k c_k d L_k / d student by autograd through it), on fresh random inputs: every kernel dtype, V = 1, a
prime and several blocks, K = 2, 3 (a padded teacher slot) and 4, per-teacher masks (a token no teacher sees, a
teacher that sees none of a sequence), teachers with a padded vocabulary, a shifted time axis and a misaligned
start (16-byte loads off), -inf vocabulary padding, a temperature; outputs poisoned (conftest.py). Then the route:
which calls take the pass, groups of four, and how often each student row is read.
"""

from __future__ import annotations

import pytest
import torch

import wpkl
from utils import DTYPES, assert_grad_close, assert_values_close
from wpkl.backends.triton_mixture import TritonMixturePass
from wpkl.backends.triton_pass import TritonPass
from wpkl.reference import token_terms
from wpkl.spec import LossSpec

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

B, T = 2, 5


def _teachers(g, student64, K, strided=True):
    """K teachers in the layouts a trainer hands over (``strided``; else contiguous), near or far from the student."""
    V = student64.shape[-1]
    out = []
    for k in range(K):
        noise = (0.3, 1.5, 3.0, 0.8)[k % 4] * torch.randn(B, T + 1, V + 3, generator=g, dtype=torch.float64)
        base = torch.nn.functional.pad(student64.nan_to_num(neginf=0.0), (0, 3))  # (the -inf set below)
        full = torch.cat([base, base[:, :1]], 1) + noise  # [B, T + 1, V + 3]
        if k == 1 and strided:
            out.append(full[:, :T, :V])  # a padded teacher vocabulary, rows V + 3 apart
        elif k == 2 and K == 3 and strided:
            out.append(full[:, 1:, 1: V + 1])  # a shifted time axis, a start one element past a 16-byte boundary
        else:
            out.append(full[:, :T, :V].contiguous())
    return out


def _valids(g, K):
    valids = torch.rand(K, B, T, generator=g) < 0.8
    valids[:, 0, 2] = False  # no teacher sees this token
    valids[K - 1, 1] = False  # the last teacher sees none of sequence 1
    valids[0, 1, 3] = True
    return valids


# reduction="none" with packed sequences placed by sequence_ids, and the stats (the engine tests of the shared passes)
BY_IDS = dict(reduction="none", return_stats=True, sequence_ids=torch.tensor([[0, 0, 1, 1, 1], [2, 3, 3, 4, 4]]),
              positions=torch.tensor([[0, 1, 0, 1, 2], [0, 0, 1, 0, 1]]))


def mixing_of(case: str, g, K):
    """The mixing of an engine test's case: a soft tensor (0 on some tokens for some teachers), a one-hot routing
    of each token, or numbers."""
    if case == "soft tensor":
        return torch.rand(K, B, T, generator=g) * (torch.rand(K, B, T, generator=g) < 0.7)
    if case == "routing":
        return torch.nn.functional.one_hot(torch.randint(0, K, (B, T), generator=g), K).permute(2, 0, 1).double()
    return [0.1 * (k + 1) for k in range(K)]


LAYOUTS = ("strided teachers", "aligned", "offset student, float32 teachers")


DIVERGENCES = (("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,K", [(1, 2), (37, 3), (150, 4), (150, 2)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_each_teachers_reference(divergence, beta, dtype, V, K, layout, small_blocks):
    """``layout``: teachers with padded rows and a shifted, misaligned start (the 16-byte teacher loads off); all
    contiguous (16-byte loads for every teacher: ALIGNED); a student one element past a 16-byte boundary with
    rows V + 1 apart, and float32 teachers (the wider dtype sets the vector)."""
    from wpkl.backends.triton_mixture import forward_launch

    g = torch.Generator().manual_seed(V * 10 + K + DTYPES.index(dtype) + 100 * LAYOUTS.index(layout) + int(1000 * beta))
    student64 = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    if V > 1:  # vocabulary padding: -inf in the student and every teacher (0 log 0 = 0)
        student64[0, :, -1] = float("-inf")
    teachers64 = _teachers(g, student64, K, strided=layout == LAYOUTS[0])
    for teacher in teachers64:  # (in place: a view's storage)
        teacher.masked_fill_(torch.isinf(student64), float("-inf"))
    student = student64.to(dtype)
    teacher_dtype = torch.float32 if layout == LAYOUTS[2] else dtype
    teachers = [t.to(teacher_dtype) if t.is_contiguous() else _like(t, teacher_dtype) for t in teachers64]
    if layout == LAYOUTS[2]:
        student = torch.nn.functional.pad(student, (1, 0))[..., 1:]
        assert student.data_ptr() % 16 == student.element_size()
    valids = _valids(g, K)
    meta = forward_launch(student, teachers, valids.reshape(K, -1).to(torch.int8), None, None, 0, 1.0)[2]
    if layout == LAYOUTS[1] or K == 3 or layout == LAYOUTS[2]:  # (K = 3: its teacher 2 starts misaligned)
        assert meta["ALIGNED"] == (layout == LAYOUTS[1])
    spec = LossSpec(divergence=divergence, beta=beta, temperature=0.7)
    loss, stats, saved = TritonMixturePass.forward(student, teachers, valids, spec)
    coef = torch.rand(K, B, T, generator=g) + 0.5
    grad = TritonMixturePass.backward(saved, coef, torch.full_like(student, float("nan")))

    assert_each_teacher(loss, stats, grad, student, valids, coef,
                        lambda x, k: token_terms(x, _truth(teachers[k], x), divergence=divergence, beta=beta,
                                                 temperature=0.7))


def _truth(teacher, x):
    """The teacher in float64 for the float64 student (the truth), else as given (the yardstick)."""
    return teacher.double() if x.dtype == torch.float64 else teacher


def assert_each_teacher(loss, stats, grad, student, valids, coef, terms):
    """A shared pass's outputs against each teacher's reference: ``terms(x, k)`` is teacher k's TokenTerms for
    the student ``x`` (float64 for the truth, the student's dtype for the gradient rule's yardstick). The loss
    and the stats match where the teacher sees a token and are 0 elsewhere; the gradient is that of
    sum_k c_k L_k, and 0 on the tokens no teacher sees."""
    dtype = student.dtype
    x = student.double().requires_grad_(True)
    low = student.clone().requires_grad_(True)  # plain torch in the inputs' dtype: the gradient rule's yardstick
    truth_total, low_total = 0.0, 0.0
    for k, v in enumerate(valids):
        ref = terms(x, k)
        for field, got in zip(("divergence", "confidence", "student_entropy", "teacher_entropy"), stats[k],
                              strict=True):
            assert_values_close(got, torch.where(v, getattr(ref, field).detach(), 0.0))
        assert_values_close(loss[k], torch.where(v, ref.loss.detach(), 0.0))
        assert torch.equal(loss[k][~v], torch.zeros_like(loss[k][~v]))  # written, and 0, where unseen
        truth_total = truth_total + torch.where(v, coef[k].double() * ref.loss, 0.0).sum()
        low_total = low_total + torch.where(v, coef[k].to(dtype) * terms(low, k).loss, 0.0).sum()
    (truth,) = torch.autograd.grad(truth_total, x)
    (same_dtype,) = torch.autograd.grad(low_total, low)
    assert_grad_close(grad, truth, same_dtype.double(), dtype)
    unseen = ~valids.any(0)
    assert torch.equal(grad[unseen], torch.zeros_like(grad[unseen]))


def assert_matches_the_reference_call(loss, stats, x, student64, teachers, upstream, **options):
    """An engine test's multi_teacher_loss call (its ``loss``, ``stats`` or None, and the student ``x`` whose
    gradient its backward of ``loss * upstream`` left) against the float64 reference call on ``student64`` and
    ``teachers`` with the same options: the loss, the gradient and the stats."""
    y = student64.clone().requires_grad_(True)
    expected = wpkl.multi_teacher_loss(y, teachers=teachers, backend="reference", **options)
    expected, expected_stats = expected if isinstance(expected, tuple) else (expected, None)
    (expected * (upstream if expected.dim() else 1.0)).sum().backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-6)
    if stats is not None:
        for name in ("divergence", "weight", "teacher_confidence", "teacher_entropy", "student_entropy"):
            torch.testing.assert_close(getattr(stats, name).double(), getattr(expected_stats, name).double(),
                                       rtol=2e-5, atol=2e-6)


def counting_projections(monkeypatch) -> list:
    """The fused-linear form's projections, as the list of the weights' data pointers they used (in order)."""
    import wpkl.engine.linear as linear

    projected, project = [], linear.project

    def counted(hidden, weight, *args):
        projected.append(weight.data_ptr())
        return project(hidden, weight, *args)

    monkeypatch.setattr(linear, "project", counted)
    return projected


def _like(view64, dtype):
    """The same strided view, in ``dtype``: the storage converted, the view taken again."""
    storage = view64._base if view64._base is not None else view64
    converted = storage.to(dtype)
    return converted.as_strided(view64.shape, view64.stride(), view64.storage_offset())


def _counting(monkeypatch):
    calls = {"mixture": [], "single": 0}
    forward, single = TritonMixturePass.forward, TritonPass.forward

    def mixture(student, teachers, valids, spec, rows=None):
        calls["mixture"].append((len(teachers), int(valids.any(0).sum())))
        return forward(student, teachers, valids, spec, rows)

    def one(*args, **kwargs):
        calls["single"] += 1
        return single(*args, **kwargs)

    monkeypatch.setattr(TritonMixturePass, "forward", staticmethod(mixture))
    monkeypatch.setattr(TritonPass, "forward", staticmethod(one))
    return calls


def _call(student, teachers, mixing, backend="triton", **options):
    return wpkl.multi_teacher_loss(student, teachers=teachers, mixing=mixing, backend=backend,
                                   weighting=wpkl.Weighting(accumulated=0.5), **options)


@pytest.mark.parametrize("K,divergence", [(2, "forward_kl"), (5, "forward_kl"), (9, "forward_kl"), (5, "jsd")])
def test_dense_mixing_reads_the_student_once_per_group_of_four(K, divergence, monkeypatch, small_blocks):
    """K = 5: a group of four and a lone teacher on its own pass; K = 9: two groups and one; jsd (beta 0.3) in
    groups of two (MAX_JSD_TEACHERS): two groups and one."""
    g = torch.Generator().manual_seed(K)
    V = 29
    student64 = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    teachers64 = [student64 + (k % 4 + 1) * 0.5 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
                  for k in range(K)]
    mask = torch.rand(B, T, generator=g) < 0.8
    mixing = [float(k + 1) / K for k in range(K)]
    calls = _counting(monkeypatch)
    x = student64.float().requires_grad_(True)
    options = dict(mask=mask, divergence=divergence, beta=0.3, temperature=1.3)
    loss = _call(x, [t.float() for t in teachers64], mixing, **options)
    loss.backward()
    size = 2 if divergence == "jsd" else 4
    groups = [min(size, K - first) for first in range(0, K, size)]
    assert calls == {"mixture": [(n, int(mask.sum())) for n in groups if n > 1],
                     "single": sum(1 for n in groups if n == 1)}
    monkeypatch.undo()
    y = student64.clone().requires_grad_(True)
    expected = _call(y, teachers64, mixing, backend="reference", **options)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-6)


OTHER_CALLS = {"routing": [], "jsd": [2], "sampled": [], "dtypes": [2], "top-k teacher": [2], "torch backend": [],
               "a teacher between elements": [2], "soft mixing tensor": [3]}


@pytest.mark.parametrize("case", OTHER_CALLS)
def test_the_other_calls_take_each_teachers_own_pass(case, monkeypatch):
    """Which teachers share the logits pass: a one-hot mixing tensor on the host is a routing (each teacher its own
    pass), a soft one is not; teachers of another dtype or form and teachers the kernels cannot address from
    teacher 0 run alone; jsd shares in groups of two (the third teacher alone); sampled (its own shared pass:
    tests/test_sampled_mixture.py) and the torch backend take no shared logits pass."""
    g = torch.Generator().manual_seed(3)
    V = 17
    student = torch.randn(B, T, V, generator=g)
    teachers = [torch.randn(B, T, V, generator=g) for _ in range(3)]
    mixing, options, backend = [0.2, 0.3, 0.5], {}, "triton"
    if case == "routing":
        mixing = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).T.float()
    elif case == "soft mixing tensor":
        mixing = torch.rand(3, B, T, generator=g)
    elif case == "sampled":
        options = dict(divergence=case, tokens=torch.randint(0, V, (B, T), generator=g))
    elif case == "jsd":
        options = dict(divergence="jsd")
    elif case == "dtypes":
        teachers[1] = teachers[1].bfloat16()
    elif case == "a teacher between elements":  # a storage one byte past an element boundary: not addressable
        raw = bytearray(1) + bytearray(teachers[1].numpy().tobytes())
        teachers[1] = torch.frombuffer(raw, dtype=torch.float32, offset=1).view(B, T, V)
        assert (teachers[1].data_ptr() - teachers[0].data_ptr()) % 4 != 0
    elif case == "top-k teacher":
        values, ids = torch.log_softmax(teachers[2], -1).topk(4, -1)
        teachers[2] = dict(teacher_topk_ids=ids, teacher_topk_logprobs=values)
    else:
        backend = "torch"
    calls = _counting(monkeypatch)
    _call(student, teachers, mixing, backend=backend, **options)
    assert [n for n, _ in calls["mixture"]] == OTHER_CALLS[case]


def test_a_mixing_tensor_is_a_routing_only_where_the_host_sees_it():
    from wpkl.api.variants import _mixing_kind

    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 2, 1], [1, 1, 0]]), 3).permute(2, 0, 1).float()
    assert _mixing_kind(one_hot) == _mixing_kind(0.3 * one_hot) == _mixing_kind(one_hot[:, 0]) == "routing"
    assert _mixing_kind(one_hot + 0.1) == _mixing_kind([1.0, 0.0, 0.0]) == _mixing_kind(None) == "dense"
    assert _mixing_kind(one_hot.to("meta")) == "device"  # a device tensor is not read on the host


def test_the_route_says_so():
    from wpkl.backends.triton_mixture import MAX_TEACHERS
    from wpkl.engine.route import Route, mixture_route
    from wpkl.inputs import build

    spec = LossSpec(backend="triton")
    student = torch.randn(B, T, 11)
    problems = [build.materialized(spec, student, torch.randn(B, T, 11)) for _ in range(6)]
    own = Route("triton", "kernels", "torch", None, False, "backend='triton'")
    plan = mixture_route(problems, [own] * 6)
    assert plan.route.terms == "mixed kernels" and "6 teachers in 2 passes" in str(plan.route)
    assert plan.groups == (("logits", tuple(range(MAX_TEACHERS))), ("logits", (4, 5)))
    assert mixture_route(problems, [own] * 6, "routing") is None
    jsd = [p.replace(spec=LossSpec(backend="triton", divergence="jsd", beta=0.3)) for p in problems]
    assert mixture_route(jsd, [own] * 6).groups == (("logits", (0, 1)), ("logits", (2, 3)), ("logits", (4, 5)))
    assert mixture_route(problems, [own] * 6, "device").groups == plan.groups  # the same bytes: shared
    topk = [build.materialized(spec, student, None, teacher_topk_ids=torch.randint(0, 11, (B, T, 3)),
                               teacher_topk_logprobs=-torch.rand(B, T, 3)) for _ in range(5)]
    for mixing in ("dense", "routing", "device"):  # top-k teachers: any number in one pass, under every mixing,
        plan = mixture_route(problems[:1] + topk, [own] * 6, mixing)  # with the logits teachers but for a routing
        if mixing == "routing":
            assert plan.groups == (("top-k", (1, 2, 3, 4, 5)),) and "6 teachers in 2 passes" in str(plan.route)
        else:
            assert plan.groups == (("logits+top-k", (0, 1, 2, 3, 4, 5)),) and "6 teachers in 1 pass" in str(plan.route)
    owns = [build.materialized(LossSpec(backend="triton", temperature=0.5), student, torch.randn(B, T, 11))
            for _ in range(2)]  # teachers of another specification share with each other, not with the rest
    assert mixture_route(owns + problems[:2], [own] * 4).groups == (("logits", (0, 1)), ("logits", (2, 3)))
    none = dict.fromkeys(("mask", "token_weights", "positions", "tokens", "num_items_in_batch", "teacher_logprobs",
                          "rollout_logprobs", "teacher_token_logprobs"))
    heads = [build.linear(spec, torch.randn(B, T, 4), torch.randn(11, 4), torch.randn(B, T, 4), torch.randn(11, 4),
                          **none) for _ in range(2)]  # hidden-state teachers: shared chunks project each teacher on every token
    assert mixture_route(heads, [own] * 2).groups == (("hidden", (0, 1)),)
    assert mixture_route(heads, [own] * 2, "device") is None and mixture_route(heads, [own] * 2, "routing") is None
    assert mixture_route(problems[:1], [own]) is None
    # vocabulary shards: every logits teacher with a KL in one group (the launches are each rank's own), not jsd's
    # (the torch pass), not a routing's; hidden-state teachers under dense mixing (one merge per chunk)
    sharded = Route("triton", "sharded kernels", "torch", None, False, "backend='triton'; vocabulary shards")
    half = problems[:3] + [build.materialized(spec, student, torch.randn(
        B, T, 11, dtype=torch.bfloat16)) for _ in range(3)]
    for mixing in ("dense", "device"):
        plan = mixture_route(half, [sharded] * 6, mixing)
        assert plan.groups == (("shards", tuple(range(6))),) and "6 teachers in 1 pass" in str(plan.route)
    assert mixture_route(half, [sharded] * 6, "routing") is None
    assert mixture_route(jsd, [sharded] * 6).groups == (("shards", tuple(range(6))),)  # jsd: launches of two
    assert mixture_route(heads, [sharded] * 2, "device") is None
    assert mixture_route(heads, [sharded] * 2).groups == (("shards", (0, 1)),)
    sampled = [p.replace(spec=LossSpec(backend="triton", divergence="sampled")) for p in problems[:3]]
    for mixing in ("dense", "routing", "device"):  # the sampled-token loss's teachers: every mixing
        assert mixture_route(sampled, [sharded] * 3, mixing).groups == (("shards-sampled", (0, 1, 2)),)
    for mixing in ("dense", "routing", "device"):  # top-k teachers: any number, every mixing, with the logits ones
        plan = mixture_route(problems[:2] + topk, [sharded] * 7, mixing)  # but for a routing
        expected = (("shards+top-k", tuple(range(7))),) if mixing != "routing" else (("shards-top-k", (2, 3, 4, 5, 6)),)
        assert plan.groups == expected, plan.groups
    assert mixture_route(problems[:1] + topk[:1], [sharded] * 2).groups == (("shards+top-k", (0, 1)),)
    assert mixture_route(jsd[:1] + topk[:2], [sharded] * 3).groups == (("shards-top-k", (1, 2)),)  # jsd: alone


@pytest.mark.parametrize("divergence", ("reverse_kl", "forward_kl", "jsd"))
@pytest.mark.parametrize("K", (3, 5))
def test_fused_linear_projects_the_student_once_per_chunk(divergence, K, monkeypatch, small_blocks):
    """The fused-linear form with dense mixing: each chunk's student logits are projected once for a group of up to
    four teachers (jsd, beta 0.3: two) (forward, and once more in the two-phase backward), against the float64 reference with a bias,
    a logit scale and a softcap on both sides, teachers of their own widths, padded heads and biases, a weighting
    and a temperature."""

    g = torch.Generator().manual_seed(K)
    H, V, chunk = 8, 37, 3
    h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, T, H), (V, H), (V,)))
    heads = [(torch.randn(B, T, H + k, generator=g, dtype=torch.float64),
              torch.randn(V + k, H + k, generator=g, dtype=torch.float64),
              torch.randn(V + k, generator=g, dtype=torch.float64)) for k in range(K)]
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1, 1] = False
    options = dict(mixing=[0.2 + 0.3 * k for k in range(K)], mask=mask, student_softcap=4.0, student_logit_scale=0.7,
                   divergence=divergence, beta=0.3, temperature=0.9, weighting=wpkl.Weighting(accumulated=0.5),
                   teacher_softcap=6.0, teacher_logit_scale=1.2, fused_linear=True)
    projected = counting_projections(monkeypatch)
    calls = _counting(monkeypatch)
    x = [t.float().requires_grad_(True) for t in (h, w, b)]
    loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=[dict(teacher_hidden=th.float(), teacher_weight=tw.float(),
                                                              teacher_bias=tb.float()) for th, tw, tb in heads],
                                   student_bias=x[2], backend="triton", chunk_size=chunk, **options)
    loss.backward()
    chunks = -(-int(mask.sum()) // chunk)
    size = 2 if divergence == "jsd" else 4
    groups = [min(size, K - first) for first in range(0, K, size)]
    shared = [n for n in groups if n > 1]
    assert [n for n, _ in calls["mixture"]] == [n for n in shared for _ in range(chunks)]
    assert projected.count(x[1].data_ptr()) == 2 * chunks * len(groups)  # forward and backward, once per group
    monkeypatch.undo()
    y = [t.clone().requires_grad_(True) for t in (h, w, b)]
    expected = wpkl.multi_teacher_loss(y[0], y[1], teachers=[dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb)
                                                             for th, tw, tb in heads],
                                       student_bias=y[2], backend="reference", **options)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for got, truth in zip(x, y, strict=True):
        torch.testing.assert_close(got.grad.double(), truth.grad, rtol=2e-4, atol=2e-6)


def test_a_teacher_below_teacher_0_in_memory():
    """The kernels address every teacher from teacher 0's pointer: a negative distance (teacher 1 stored before
    teacher 0, an odd number of elements away) gives the result of separate tensors, bit for bit."""
    g = torch.Generator().manual_seed(5)
    V = 23
    student = torch.randn(B, T, V, generator=g)
    storage = torch.randn(2 * B * T * V + 3, generator=g)
    below, above = storage[: B * T * V].view(B, T, V), storage[B * T * V + 3:].view(B, T, V)
    assert below.data_ptr() < above.data_ptr()
    valids = torch.ones(2, B, T, dtype=torch.bool)
    spec = LossSpec(divergence="reverse_kl")
    coef = torch.rand(2, B, T, generator=g)
    results = []
    for teachers in ([above, below], [above.clone(), below.clone()]):
        loss, stats, saved = TritonMixturePass.forward(student, teachers, valids, spec)
        results.append((loss, stats, TritonMixturePass.backward(saved, coef, torch.empty_like(student))))
    for got, separate in zip(*results, strict=True):
        assert torch.equal(got, separate)


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("torch", torch.float32),
                                           ("torch", torch.bfloat16)])  # (the torch pass: eager, and recomputed)
@pytest.mark.parametrize("divergence", ("reverse_kl", "forward_kl", "jsd"))
def test_a_token_no_teacher_weighs_keeps_a_finite_gradient(divergence, backend, dtype, small_blocks):
    """A token every mixing weight is 0 on goes to teacher 0 at weight 0 (for the student's entropy, variants.py):
    what teacher 0's row holds there (here all -inf: its terms NaN) changes nothing, the loss and the gradient
    (0 on that token, never NaN) are those of a finite row there."""
    g = torch.Generator().manual_seed(21)
    V = 37
    student = torch.randn(B, T, V, generator=g).to(dtype)
    teachers = [student + torch.randn(B, T, V, generator=g).to(dtype) for _ in range(2)]
    mixing = torch.rand(2, B, T, generator=g) + 0.1
    mixing[:, 0, 2] = 0.0
    results = []
    for fill in (float("-inf"), 0.0):
        given = [t.clone() for t in teachers]
        given[0][0, 2] = fill
        x = student.clone().requires_grad_(True)
        loss = wpkl.multi_teacher_loss(x, teachers=given, mixing=mixing, divergence=divergence, beta=0.3,
                                       backend=backend, reduction="sum")
        loss.backward()
        results.append((loss, x.grad))
    assert torch.isfinite(results[0][1]).all() and torch.equal(results[0][1][0, 2], torch.zeros(V, dtype=dtype))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
