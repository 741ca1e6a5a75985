"""Every bad input raises ValueError or TypeError naming the argument, before any kernel runs."""

import math

import pytest
import torch

import wpkl
import wpkl.engine.fused
import wpkl.engine.linear
import wpkl.engine.route
import wpkl.engine.terms

# Where the engine starts computing (after every input check): the per-token terms of each route.
ENTRY_POINTS = [(wpkl.engine.terms, "logits_terms"), (wpkl.engine.linear, "linear_terms"),
                (wpkl.engine.fused, "fused_loss")]
REAL = {(module, name): getattr(module, name) for module, name in ENTRY_POINTS}


def allow_backends(monkeypatch):
    for (module, name), real in REAL.items():
        monkeypatch.setattr(module, name, real)

S = torch.randn(2, 3, 10)
T = torch.randn(2, 3, 10)


def call(**overrides):
    kwargs = dict(student_logits=S, teacher_logits=T)
    kwargs.update(overrides)
    return wpkl.weighted_kl_loss(**kwargs)


@pytest.fixture(autouse=True)
def no_kernel_launch(monkeypatch):
    """A bad input must be rejected before any backend runs."""
    def boom(*args, **kwargs):
        raise AssertionError("a backend ran on bad input")

    for module, name in ENTRY_POINTS:
        monkeypatch.setattr(module, name, boom)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(student_logits=S.numpy()), TypeError, "student_logits must be a torch.Tensor"),
    (dict(student_logits=S.long()), TypeError, "student_logits must be float"),
    (dict(teacher_logits=T.int()), TypeError, "teacher_logits must be float"),
    (dict(student_logits=torch.randn(10)), ValueError, "student_logits must have shape"),
    (dict(student_logits=torch.randn(2, 3, 0), teacher_logits=torch.randn(2, 3, 0)), ValueError, "empty vocabulary"),
    (dict(teacher_logits=torch.randn(2, 4, 10)), ValueError, "leading shape"),
    (dict(teacher_logits=torch.randn(2, 3, 9)), ValueError, "vocabulary 9 < the student's 10"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite"),
    (dict(temperature=math.nan), ValueError, "temperature must be finite"),
    (dict(temperature="1"), TypeError, "temperature must be a real number"),
    (dict(beta=1.5), ValueError, "beta must be in [0, 1]"),
    (dict(beta=-0.1), ValueError, "beta must be in [0, 1]"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(weighting="position"), TypeError, "weighting must be a wpkl.Weighting"),
    (dict(mask=torch.ones(2, 3)), TypeError, "mask must be a bool tensor"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have the logits' leading shape"),
    (dict(mask=[[True] * 3] * 2), TypeError, "mask must be a torch.Tensor"),
    (dict(token_weights=torch.ones(2, 3, dtype=torch.long)), TypeError, "token_weights must be a floating-point"),
    (dict(token_weights=torch.ones(3, 2)), ValueError, "token_weights must have the logits' leading shape"),
    (dict(token_weights=-torch.ones(2, 3)), ValueError, "token_weights must be finite and >= 0"),
    (dict(token_weights=torch.full((2, 3), math.nan)), ValueError, "token_weights must be finite and >= 0"),
    (dict(token_weights=torch.full((2, 3), math.inf)), ValueError, "token_weights must be finite and >= 0"),
    (dict(positions=torch.zeros(2, 3)), TypeError, "positions must be an integer"),
    (dict(positions=torch.zeros(2, 2, dtype=torch.long)), ValueError, "positions must have the logits' leading"),
    (dict(positions=-torch.ones(2, 3, dtype=torch.long)), ValueError, "positions must be >= 0"),
    (dict(divergence="sampled"), ValueError, "needs tokens"),
    (dict(divergence="sampled", tokens=torch.zeros(2, 3)), TypeError, "tokens must be an integer"),
    (dict(divergence="sampled", tokens=torch.zeros(3, dtype=torch.long)), ValueError, "tokens must have the logits'"),
    (dict(divergence="sampled", tokens=torch.full((2, 3), 10)), ValueError, "tokens must lie in [0, V)"),
    (dict(divergence="sampled", tokens=torch.full((2, 3), -1)), ValueError, "tokens must lie in [0, V)"),
    (dict(student_logits=S[0], teacher_logits=T[0], reduction="seq_mean"), ValueError, "seq_mean"),
    (dict(student_logits=S[0], teacher_logits=T[0], weighting=wpkl.Weighting(position=wpkl.ExpDecay(2.0))),
     ValueError, "position weighting on [N, V] input needs positions"),
    (dict(student_logits=S[0], teacher_logits=T[0], weighting=wpkl.Weighting(accumulated=0.5)),
     ValueError, "needs [B, T, V] input"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be finite and > 0"),
    (dict(num_items_in_batch=torch.tensor(0)), ValueError, "num_items_in_batch must be finite and > 0"),
    (dict(num_items_in_batch=torch.tensor(-5)), ValueError, "num_items_in_batch must be finite and > 0"),
    (dict(num_items_in_batch=torch.tensor(math.nan)), ValueError, "num_items_in_batch must be finite and > 0"),
    (dict(num_items_in_batch=torch.tensor(True)), TypeError, "num_items_in_batch must be a real number"),
    (dict(num_items_in_batch=math.inf), ValueError, "num_items_in_batch must be finite"),
    (dict(teacher_logits=None, divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long),
          teacher_logprobs=torch.rand(2, 3) + 0.01), ValueError, "teacher_logprobs must be log-probabilities"),
    (dict(divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long),
          rollout_logprobs=torch.rand(2, 3) + 0.01), ValueError, "rollout_logprobs must be log-probabilities"),
    (dict(num_items_in_batch=4, reduction="sum"), ValueError, "num_items_in_batch replaces"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch must be a scalar"),
    (dict(return_stats="yes"), TypeError, "return_stats must be a bool"),
    (dict(inplace_backward=1), TypeError, "inplace_backward must be a bool"),
    (dict(inplace_backward=True, backend="torch"), ValueError, "inplace_backward=True needs the Triton backend"),
    (dict(inplace_backward=True, backend="reference"), ValueError, "inplace_backward=True needs the Triton"),
    (dict(teacher_logits=None), ValueError, "teacher_logits may be None only"),
    (dict(teacher_logits=None, divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     "teacher_logits may be None only"),
    (dict(divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long), teacher_logprobs=torch.zeros(2, 3)),
     ValueError, "not both"),
    (dict(rollout_logprobs=torch.zeros(2, 3)), ValueError, "rollout_logprobs only applies"),
    (dict(teacher_logits=None, divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long),
          teacher_logprobs=torch.zeros(2, 3), weighting=wpkl.Weighting(confidence=1.0)), ValueError,
     "needs teacher_logits"),
    (dict(teacher_logits=None, divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long),
          teacher_logprobs=torch.full((2, 3), -math.inf)), ValueError, "teacher_logprobs must be finite"),
    (dict(divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long),
          rollout_logprobs=torch.full((2, 3), math.nan)), ValueError, "rollout_logprobs must be finite"),
    (dict(divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long), rollout_logprobs=torch.zeros(2)),
     ValueError, "rollout_logprobs must have the logits' leading shape"),
    (dict(weighting=wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence())), ValueError, "needs log q(y) of the sampled tokens"),
    (dict(weighting=wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence()), teacher_token_logprobs=torch.zeros(2, 3, dtype=torch.long)), TypeError,
     "teacher_token_logprobs must be a floating-point"),
    (dict(weighting=wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence()), teacher_token_logprobs=torch.zeros(3, 2)), ValueError,
     "teacher_token_logprobs must have the logits' leading shape"),
    (dict(weighting=wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence()), teacher_token_logprobs=torch.full((2, 3), 0.5)), ValueError,
     "teacher_token_logprobs must be log-probabilities"),
    (dict(weighting=wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence()), teacher_token_logprobs=torch.full((2, 3), -math.inf)), ValueError,
     "teacher_token_logprobs must be finite"),
    (dict(teacher_logits=None, divergence="sampled", tokens=torch.zeros(2, 3, dtype=torch.long),
          teacher_logprobs=torch.zeros(2, 3), teacher_token_logprobs=torch.zeros(2, 3)), ValueError, "not both"),
    (dict(student_logits=S[0], teacher_logits=T[0], weighting=wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence()), tokens=torch.zeros(3, dtype=torch.long)),
     ValueError, "prefix_confidence=...) on [N, V] input needs positions"),
])
def test_bad_input(overrides, error, words):
    with pytest.raises(error, match=None) as info:
        call(**overrides)
    assert words in str(info.value), str(info.value)


def test_bad_values_on_masked_tokens_are_ignored(monkeypatch):
    """TRL marks ignored tokens with -100: out-of-range values where mask is False are fine."""
    allow_backends(monkeypatch)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    tokens = torch.where(mask, 3, -100)
    weights = torch.where(mask, 1.0, math.nan)
    loss = call(mask=mask, tokens=tokens, divergence="sampled", token_weights=weights, positions=tokens)
    assert torch.isfinite(loss)


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="needs a machine without a GPU")
def test_mismatched_devices_name_the_argument():
    meta = torch.randn(2, 3, 10, device="meta")
    with pytest.raises(ValueError, match="teacher_logits is on meta"):
        call(teacher_logits=meta)
    with pytest.raises(ValueError, match="mask is on meta"):
        call(mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))


def test_triton_backend_with_float64_is_refused(monkeypatch):
    allow_backends(monkeypatch)
    with pytest.raises(ValueError, match="supports float32, bfloat16 and float16"):
        call(student_logits=S.double(), backend="triton")


@pytest.mark.parametrize("make,error,words", [
    (lambda: wpkl.ExpDecay(0.0), ValueError, "half_life must be > 0"),
    (lambda: wpkl.ExpDecay(-2.0), ValueError, "half_life must be > 0"),
    (lambda: wpkl.ExpDecay(math.inf), ValueError, "half_life must be finite"),
    (lambda: wpkl.PowerDecay(-0.5), ValueError, "alpha must be >= 0"),
    (lambda: wpkl.PositionTable([]), ValueError, "must not be empty"),
    (lambda: wpkl.PositionTable([1.0, -0.5]), ValueError, "values[1] must be >= 0"),
    (lambda: wpkl.PositionTable(3.0), TypeError, "must be a sequence"),
    (lambda: wpkl.PositionWindow(0.5, 0.5), ValueError, "0 <= start < end <= 1"),
    (lambda: wpkl.PositionWindow(0.7, 0.3), ValueError, "0 <= start < end <= 1"),
    (lambda: wpkl.PositionWindow(30, 70), ValueError, "fractions of the response"),  # percent, not fractions
    (lambda: wpkl.PositionWindow(0, 30), ValueError, "fractions of the response"),
    (lambda: wpkl.PositionWindow(0.0, math.inf), ValueError, "end must be finite"),
    (lambda: wpkl.PositionWindow(0.0, "1"), TypeError, "end must be a real number"),
    (lambda: wpkl.PositionWindow(-0.1, 0.3), ValueError, "start must be >= 0"),
    (lambda: wpkl.PositionSigmoid(w_min=1.5), ValueError, "w_min must be in [0, 1]"),
    (lambda: wpkl.PositionSigmoid(scale=0.0), ValueError, "scale must be > 0"),
    (lambda: wpkl.PositionSigmoid(center=math.nan), ValueError, "center must be finite"),
    (lambda: wpkl.Weighting(confidence=-1.0), ValueError, "confidence must be >= 0"),
    (lambda: wpkl.Weighting(disagreement=-0.5), ValueError, "disagreement must be >= 0"),
    (lambda: wpkl.Weighting(accumulated=-0.5), ValueError, "accumulated must be >= 0"),
    (lambda: wpkl.Weighting(accumulated=math.nan), ValueError, "accumulated must be finite"),
    (lambda: wpkl.Weighting(position=2.0), TypeError, "Weighting.position must be one of"),
    (lambda: wpkl.Weighting(normalize=1), TypeError, "normalize must be a bool"),
    (lambda: wpkl.Weighting(w_max=0.0), ValueError, "Weighting.w_max must be > 0"),
    (lambda: wpkl.Weighting(w_max=math.inf), ValueError, "Weighting.w_max must be finite"),
    (lambda: wpkl.Weighting(w_max="1.5"), TypeError, "Weighting.w_max must be a real number"),
    (lambda: wpkl.Weighting(prefix_confidence=0.5), TypeError, "Weighting.prefix_confidence must be a PrefixConfidence"),
    (lambda: wpkl.PrefixConfidence(alpha=-1.0), ValueError, "PrefixConfidence.alpha must be >= 0"),
    (lambda: wpkl.PrefixConfidence(window=0), ValueError, "PrefixConfidence.window must be >= 1"),
    (lambda: wpkl.PrefixConfidence(window=8.0), TypeError, "PrefixConfidence.window must be an int"),
    (lambda: wpkl.PrefixConfidence(window=True), TypeError, "PrefixConfidence.window must be an int"),
    (lambda: wpkl.PrefixConfidence(worst=0.0), ValueError, "PrefixConfidence.worst must be > 0"),
    (lambda: wpkl.PrefixConfidence(worst=1.5), ValueError, "PrefixConfidence.worst must be in (0, 1]"),
    (lambda: wpkl.PrefixConfidence(floor=-0.1), ValueError, "PrefixConfidence.floor must be >= 0"),
    (lambda: wpkl.PrefixConfidence(floor=2.0), ValueError, "PrefixConfidence.floor must be in [0, 1]"),
    (lambda: wpkl.PrefixConfidence(alpha=math.nan), ValueError, "PrefixConfidence.alpha must be finite"),
    (lambda: wpkl.WeightedKLLoss(divergence="tv"), ValueError, "divergence must be one of"),
    (lambda: wpkl.WeightedKLLoss(temperature=0), ValueError, "temperature must be > 0"),
    (lambda: wpkl.WeightedKLLoss(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_configuration(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("weighting", [wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence())])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_torch_only_weightings_on_triton(monkeypatch, weighting, backend):
    """prefix_confidence is not in the Triton weights kernel: with Triton picked (explicitly or by auto) the
    kernels' vocabulary pass runs and the torch weights follow (never the whole torch pass, never a refusal)."""
    monkeypatch.setattr(wpkl.engine.route, "_backend", lambda problem: ("triton", "as if on CUDA"))
    tokens = torch.zeros(2, 3, dtype=torch.long)
    ran = []
    real = REAL[(wpkl.engine.terms, "logits_terms")]
    monkeypatch.setattr(wpkl.engine.terms, "logits_terms", lambda problem, route: ran.append(route) or
                        real(problem, route))
    loss = call(weighting=weighting, tokens=tokens, backend=backend)
    assert [(r.backend, r.terms, r.weights) for r in ran] == [("triton", "kernels", "torch")], ran
    assert "weighs in torch" in str(ran[0]) and torch.isfinite(loss)


def test_logprobs_allow_rounding_above_zero(monkeypatch):
    """A near-certain token's log-prob may round slightly above 0; that is accepted, and used as given."""
    allow_backends(monkeypatch)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    logprobs = torch.full((2, 3), 1e-4)
    loss = call(teacher_logits=None, divergence="sampled", tokens=tokens, teacher_logprobs=logprobs)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("count", [0, torch.tensor(0), torch.tensor(-5), torch.tensor(0.0)])
def test_num_items_with_no_valid_token_gives_zero(monkeypatch, count):
    """An empty step (no valid token, e.g. num_items = response_mask.sum() = 0): loss 0, gradient 0, no NaN."""
    allow_backends(monkeypatch)
    student = S.clone().requires_grad_(True)
    loss = call(student_logits=student, mask=torch.zeros(2, 3, dtype=torch.bool), num_items_in_batch=count)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(student.grad) == 0


def test_inplace_backward_is_ignored_when_auto_picks_the_torch_path(monkeypatch):
    allow_backends(monkeypatch)
    student = S.clone().requires_grad_(True)
    call(student_logits=student, inplace_backward=True).backward()
    expected = S.clone().requires_grad_(True)
    call(student_logits=expected).backward()
    torch.testing.assert_close(student.grad, expected.grad)
    assert torch.equal(student.detach(), S)  # the logits were not overwritten
