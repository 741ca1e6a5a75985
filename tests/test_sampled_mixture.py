"""Several teachers of the sampled-token loss in one pass (wpkl/backends/triton_sampled.py:
TritonSampledMixturePass), as wpkl.multi_teacher_loss runs divergence="sampled": the student row read once forward
(its log-normalizer and entropy, which no teacher changes) and once backward (one "sampled" backward kernel with
the multiplier sum_k c_k (-a_k)), each logits teacher's row once by its own pass, log q(y) teachers as given.

The pass against the float64 reference teacher by teacher (``token_terms``; the gradient against sum_k c_k
d L_k / d student by autograd), on fresh random inputs: every kernel dtype, V = 1, a prime and several blocks,
K = 2 and 3 teachers mixing logits (one with a padded vocabulary) and log q(y) answers, per-teacher masks (a
token no teacher sees), -inf vocabulary padding, a temperature, the rollout's log p(y) and PowerOPD's power;
outputs poisoned (conftest.py). Then: what a teacher does not see is never read, an out-of-range token, and
the engine: passes counted under every mixing, the fused-linear form's projections counted.
"""

from __future__ import annotations

import pytest
import torch

import wpkl
from test_mixture_pass import BY_IDS, B, T, _truth, _valids, assert_each_teacher, counting_projections, mixing_of
from utils import DTYPES
from wpkl.backends import triton_sampled, triton_topk
from wpkl.backends.triton_sampled import SampledTeacher, TritonSampledMixturePass
from wpkl.reference import token_terms
from wpkl.spec import LossSpec

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _inputs(g, V, K, dtype):
    """A student with -inf padding, K teachers near it (teacher 0 with a padded vocabulary, every other one a
    server's log q(y) answer), the sampled tokens (never a padded column) and a rollout's log p(y)."""
    student64 = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    if V > 1:
        student64[0, :, -1] = float("-inf")  # vocabulary padding (0 log 0 = 0)
    tokens = torch.randint(0, max(V - 1, 1), (B, T), generator=g)
    teachers = []
    for k in range(K):
        logits = torch.nn.functional.pad(student64.nan_to_num(neginf=0.0), (0, 3))
        logits = logits + (0.5 + k) * torch.randn(B, T, V + 3, generator=g, dtype=torch.float64)
        logits[..., :V][torch.isinf(student64)] = float("-inf")
        if k % 2 == 0:
            teachers.append(logits[..., : V + 3 if k == 0 else V].to(dtype))
        else:
            teachers.append(torch.log_softmax(logits[..., :V] / 0.7, -1).gather(-1, tokens[..., None])[..., 0])
    rollout = torch.log_softmax(student64 / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    rollout = rollout + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return student64.to(dtype), teachers, tokens, rollout.float()


def _sampled(teachers, tokens, rollout):
    return [SampledTeacher(tokens, rollout, *((t, None) if t.dim() == 3 else (None, t.float()))) for t in teachers]


def _reference(teachers, tokens, rollout, power):
    def terms(x, k):
        t = teachers[k]
        logits, logprobs = (_truth(t, x), None) if t.dim() == 3 else (None, t.double())
        return token_terms(x, logits, divergence="sampled", temperature=0.7, tokens=tokens, teacher_logprobs=logprobs,
                           rollout_logprobs=None if rollout is None else rollout.double(), power=power)

    return terms


@pytest.mark.parametrize("rollout,power", [(False, None), (True, None), (False, 5.0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,K", [(1, 2), (37, 3), (150, 2)])
def test_matches_each_teachers_reference(rollout, power, dtype, V, K, small_blocks):
    g = torch.Generator().manual_seed(V * 10 + K + DTYPES.index(dtype) + 7 * (power is not None) + 3 * rollout)
    student, teachers, tokens, behaviour = _inputs(g, V, K, dtype)
    behaviour = behaviour if rollout else None
    valids = _valids(g, K)
    spec = LossSpec(divergence="sampled", temperature=0.7, sampled_power=power)
    loss, stats, saved = TritonSampledMixturePass.forward(student, _sampled(teachers, tokens, behaviour), valids, spec)
    coef = torch.rand(K, B, T, generator=g) + 0.5
    grad = TritonSampledMixturePass.backward(saved, coef, torch.full_like(student, float("nan")))
    assert_each_teacher(loss, stats, grad, student, valids, coef, _reference(teachers, tokens, behaviour, power))


def test_what_a_teacher_does_not_see_is_never_read(small_blocks):
    """Garbage on the tokens a teacher does not see (NaN and inf logits, NaN log q(y)) changes nothing: the
    values and the gradient are those of the same call with clean teachers there, bit for bit."""
    g = torch.Generator().manual_seed(3)
    V, K = 23, 3
    student, teachers, tokens, _ = _inputs(g, V, K, torch.float32)
    valids = _valids(g, K)
    spec = LossSpec(divergence="sampled", temperature=0.8)
    coef = torch.rand(K, B, T, generator=g) + 0.5
    results = []
    for dirty in (False, True):
        given = [t.clone() for t in teachers]
        if dirty:
            for k, t in enumerate(given):
                t[~valids[k]] = float("nan")
                if t.dim() == 3:
                    t[..., 0][~valids[k]] = float("inf")
        loss, stats, saved = TritonSampledMixturePass.forward(student, _sampled(given, tokens, None), valids, spec)
        results.append((loss, stats, TritonSampledMixturePass.backward(saved, coef, torch.full_like(student, 7.0))))
    for clean, dirty in zip(*results, strict=True):  # (NaN: a log q(y) teacher's unknown confidence and entropy)
        torch.testing.assert_close(clean, dirty, rtol=0, atol=0, equal_nan=True)


def test_an_out_of_range_token_gives_nan_not_another_column(small_blocks):
    """A sampled token >= V (the value checks report it; in the pass itself): that token's loss is NaN for every
    teacher, never a number read from another column; the other tokens are untouched."""
    g = torch.Generator().manual_seed(5)
    V, K = 19, 2
    student, teachers, tokens, _ = _inputs(g, V, K, torch.float32)
    bad = tokens.clone()
    bad[1, 2] = V + 4
    valids = torch.ones(K, B, T, dtype=torch.bool)
    spec = LossSpec(divergence="sampled")
    loss, _, _ = TritonSampledMixturePass.forward(student, _sampled(teachers, bad, None), valids, spec)
    clean, _, _ = TritonSampledMixturePass.forward(student, _sampled(teachers, tokens, None), valids, spec)
    assert torch.isnan(loss[:, 1, 2]).all()
    others = torch.ones(B, T, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(loss[:, others], clean[:, others])


def _counting(monkeypatch):
    calls = {"student forward": 0, "teacher forward": 0, "dense backward": 0, "groups": []}
    student_pass, teacher_pass, backward = (triton_topk.student_pass, triton_sampled._teacher_pass,
                                            triton_sampled.TritonPass.backward)
    forward = TritonSampledMixturePass.forward

    def count(name, fn):
        def counted(*args):
            calls[name] += 1
            return fn(*args)
        return counted

    def counted_group(student, teachers, valids, spec):
        calls["groups"].append(len(teachers))
        return forward(student, teachers, valids, spec)

    monkeypatch.setattr(triton_topk, "student_pass", count("student forward", student_pass))
    monkeypatch.setattr(triton_sampled, "_teacher_pass", count("teacher forward", teacher_pass))
    monkeypatch.setattr(triton_sampled.TritonPass, "backward", staticmethod(count("dense backward", backward)))
    monkeypatch.setattr(TritonSampledMixturePass, "forward", staticmethod(counted_group))
    return calls


def _given(teachers, first="teacher_logits"):
    return [t if t.dim() == 3 else {first: None, "teacher_logprobs": t} for t in teachers]


@pytest.mark.parametrize("mixing", ["numbers", "soft tensor", "routing", "power and rollout", "none, by ids"])
def test_every_mixing_reads_the_student_once(mixing, monkeypatch, small_blocks):
    """Five teachers (logits and log q(y) answers): one student pass forward, one teacher pass per logits teacher,
    one dense pass backward, against the float64 reference (loss, gradient) with a weighting, a mask and a
    temperature; a soft mixing tensor and a one-hot routing take the same pass; reduction="none" with packed
    sequences (``sequence_ids``) and the stats."""
    g = torch.Generator().manual_seed(13)
    V, K = 41, 5
    student64, teachers, tokens, rollout = _inputs(g, V, K, torch.float64)
    weights = mixing_of(mixing, g, K)
    mask = torch.rand(B, T, generator=g) < 0.8
    options = dict(mixing=weights, mask=mask, tokens=tokens, divergence="sampled", temperature=0.7,
                   weighting=wpkl.Weighting(accumulated=0.5))
    if mixing == "power and rollout":
        options.update(sampled_power=5.0, rollout_logprobs=rollout.double())
    if mixing == "none, by ids":
        options.update(BY_IDS)
    upstream = torch.randn(B, T, generator=g, dtype=torch.float64)
    calls = _counting(monkeypatch)
    x = student64.float().requires_grad_(True)
    ours = {**options, **({"rollout_logprobs": rollout} if "rollout_logprobs" in options else {})}
    loss = wpkl.multi_teacher_loss(x, teachers=_given([t.float() for t in teachers]), backend="triton", **ours)
    loss, stats = loss if isinstance(loss, tuple) else (loss, None)
    (loss * (upstream.float() if loss.dim() else 1.0)).sum().backward()
    logits_teachers = sum(t.dim() == 3 for t in teachers)
    assert calls == {"student forward": 1, "teacher forward": logits_teachers, "dense backward": 1, "groups": [K]}
    monkeypatch.undo()
    y = student64.clone().requires_grad_(True)
    expected = wpkl.multi_teacher_loss(y, teachers=_given(teachers), backend="reference", **options)
    expected, expected_stats = expected if isinstance(expected, tuple) else (expected, None)
    (expected * (upstream if expected.dim() else 1.0)).sum().backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-6)
    if stats is not None:
        for name in ("divergence", "weight", "teacher_confidence", "teacher_entropy", "student_entropy"):
            torch.testing.assert_close(getattr(stats, name).double(), getattr(expected_stats, name).double(),
                                       rtol=2e-5, atol=2e-6, equal_nan=True)


@pytest.mark.parametrize("heads", [0, 2])
def test_fused_linear_projects_the_student_once_per_chunk(heads, monkeypatch, small_blocks):
    """The fused-linear form with three log q(y) teachers, and with two hidden-state teachers beside them (one with
    its own softcap, each projected with its own options): each
    chunk's student logits projected once for all of them (forward, and once more in the two-phase backward),
    each teacher's once (forward only: the backward reads no teacher), against the float64 reference with a bias,
    a logit scale and softcaps on both sides."""
    g = torch.Generator().manual_seed(6 + heads)
    H, V, K, chunk = 8, 37, 3, 3
    h, w, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, T, H), (V, H), (V,)))
    tokens = torch.randint(0, V, (B, T), generator=g)
    answers = [torch.rand(B, T, generator=g, dtype=torch.float64).log() - k for k in range(K)]
    teachers = [(torch.randn(B, T, H + k, generator=g, dtype=torch.float64),
                 torch.randn(V + k, H + k, generator=g, dtype=torch.float64)) for k in range(heads)]
    mask = torch.rand(B, T, generator=g) < 0.8
    options = dict(mixing=[0.5, 0.3, 0.2, 0.4, 0.6][: K + heads], mask=mask, tokens=tokens, student_softcap=4.0,
                   student_logit_scale=0.7, teacher_softcap=5.0, divergence="sampled", temperature=0.9,
                   weighting=wpkl.Weighting(accumulated=0.5), fused_linear=True)

    def given(dtype):
        return (_given([a.to(dtype) for a in answers], "teacher_hidden")
                + [dict(teacher_hidden=th.to(dtype), teacher_weight=tw.to(dtype), **({"teacher_softcap": 3.0} if k else {}))
                   for k, (th, tw) in enumerate(teachers)])  # the second head with its own softcap: it still shares

    projected = counting_projections(monkeypatch)
    calls = _counting(monkeypatch)
    x = [t.float().requires_grad_(True) for t in (h, w, b)]
    loss = wpkl.multi_teacher_loss(x[0], x[1], teachers=given(torch.float32), student_bias=x[2], backend="triton",
                                   chunk_size=chunk, **options)
    loss.backward()
    chunks = -(-int(mask.sum()) // chunk)
    assert calls["groups"] == [K + heads] * chunks and calls["student forward"] == chunks
    assert calls["teacher forward"] == heads * chunks and projected.count(x[1].data_ptr()) == 2 * chunks
    assert len(projected) == (2 + heads) * chunks
    monkeypatch.undo()
    y = [t.clone().requires_grad_(True) for t in (h, w, b)]
    expected = wpkl.multi_teacher_loss(y[0], y[1], teachers=given(torch.float64), student_bias=y[2],
                                       backend="reference", **options)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    for got, truth in zip(x, y, strict=True):
        torch.testing.assert_close(got.grad.double(), truth.grad, rtol=2e-4, atol=2e-6)



@pytest.mark.parametrize("mixing", ["dense", "routing", "device"])
def test_the_route_groups_every_sampled_token_teacher(mixing):
    """Logits and log q(y) teachers of the sampled-token loss share one pass under every mixing (the shared pass
    does no teacher's work per element); the only teacher of its form, the torch backend and another divergence
    do not; the route says how many passes run."""
    from wpkl.engine.route import mixture_route, route
    from wpkl.inputs import build

    V = 11
    student, tokens = torch.randn(B, T, V), torch.randint(0, V, (B, T))

    def plan(forms, backend="triton", divergence="sampled"):
        spec = LossSpec(backend=backend, divergence=divergence)
        extra = dict(tokens=tokens) if divergence == "sampled" else {}
        problems = [build.materialized(spec, student, torch.randn(B, T, V), **extra) if form == "logits" else
                    build.materialized(spec, student, None, teacher_logprobs=-torch.rand(B, T), **extra)
                    for form in forms]
        routes = [route(p, mixture=True) for p in problems]
        return mixture_route(problems, routes, mixing)

    shared = plan(["logits", "server", "logits", "server", "server", "logits"])
    assert shared.groups == (("sampled", tuple(range(6))),)
    assert "6 teachers in 1 pass," in str(shared.route) and "6 sampled teachers" in str(shared.route)
    assert plan(["server", "server"]).groups == (("sampled", (0, 1)),)
    assert plan(["server"]) is None
    assert plan(["logits", "server"], backend="torch") is None
    assert mixing == "routing" or plan(["logits", "logits"], divergence="reverse_kl").groups[0][0] == "logits"
    # the fused-linear form: hidden-state teachers join the log q(y) ones only under dense mixing (a shared chunk
    # projects each of them on every token), whatever their own projection options
    H = 4
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    spec = LossSpec.from_options(linear=True, backend="triton", divergence="sampled")
    none = dict.fromkeys(("mask", "token_weights", "positions", "num_items_in_batch", "rollout_logprobs",
                          "teacher_token_logprobs"))
    problems = [build.linear(spec, hidden, weight, None, None, tokens=tokens, teacher_logprobs=-torch.rand(B, T),
                             **none),
                build.linear(spec.replace(teacher_softcap=3.0), hidden, weight, torch.randn(B, T, H),
                             torch.randn(V, H), tokens=tokens, teacher_logprobs=None, **none),
                build.linear(spec, hidden, weight, None, None, tokens=tokens, teacher_logprobs=-torch.rand(B, T),
                             **none)]
    linear = mixture_route(problems, [route(p, mixture=True) for p in problems], mixing)
    assert linear.groups == ((("sampled", (0, 1, 2)),) if mixing == "dense" else (("sampled", (0, 2)),))


class _LargeOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """The (op, shape) of each new tensor (not a view) of at least ``limit`` elements that torch ops make outside
    the kernels' launches (where the interpreter copies the arguments)."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.paused, self.seen = limit, False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            leaves = torch.utils._pytree.tree_leaves
            given = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            self.seen += [(str(func), tuple(t.shape)) for t in leaves(out) if isinstance(t, torch.Tensor)
                          and t.numel() >= self.limit and t.untyped_storage().data_ptr() not in given]
        return out


def test_strided_rows_are_read_in_place(monkeypatch, small_blocks):
    """A student cut from a longer sequence (``logits[:, :-1]``: its batch and time axes do not merge) and a
    shifted teacher with a padded vocabulary: the values and the gradient are those of contiguous copies, and
    the pass makes no tensor of the student's size (no copy, no [N, V] temporary; the gradient buffer is the
    caller's)."""
    import wpkl.backends.triton_pass as triton_pass
    import wpkl.backends.triton_topk as triton_topk

    g = torch.Generator().manual_seed(8)
    V, K = 37, 3
    longer = 2 * torch.randn(B, T + 1, V, generator=g)
    student = longer[:, :-1]
    teacher = (longer + torch.randn(B, T + 1, V, generator=g)).repeat(1, 1, 2)[:, 1:, : V + 3]
    answer = -torch.rand(B, T, generator=g) * 3
    tokens = torch.randint(0, V, (B, T), generator=g)
    valids = _valids(g, K)
    coef = torch.rand(K, B, T, generator=g) + 0.5
    spec = LossSpec(divergence="sampled", temperature=0.9)
    mode = _LargeOutputs(B * T * V)
    for module in (triton_pass, triton_topk, triton_sampled):
        def paused(*args, launch=module.launch):
            mode.paused = True
            try:
                return launch(*args)
            finally:
                mode.paused = False
        monkeypatch.setattr(module, "launch", paused)
    results = []
    for given in ((student, teacher), (student.contiguous(), teacher.contiguous())):
        teachers = _sampled([given[1], answer, given[1][..., :V]], tokens, None)
        out = torch.full((B, T, V), float("nan"))
        with mode:
            loss, stats, saved = TritonSampledMixturePass.forward(given[0], teachers, valids, spec)
            grad = TritonSampledMixturePass.backward(saved, coef, out)
        results.append((loss, stats, grad))
    assert mode.seen == []
    for strided, contiguous in zip(*results, strict=True):
        torch.testing.assert_close(strided, contiguous, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_no_tokens(small_blocks):
    """An empty batch: zero-size outputs and gradient, no error, one teacher and several."""
    student = torch.randn(2, 0, 19, requires_grad=True)
    tokens = torch.zeros(2, 0, dtype=torch.int64)
    teachers = [torch.randn(2, 0, 19), dict(teacher_logits=None, teacher_logprobs=torch.zeros(2, 0))]
    loss = wpkl.multi_teacher_loss(student, teachers=teachers, tokens=tokens, divergence="sampled", backend="triton",
                                   reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == student.shape
