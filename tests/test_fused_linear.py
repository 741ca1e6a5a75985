"""fused_linear_kl_loss: from hidden states and lm_head weights, equal to weighted_kl_loss on the materialized
logits (the float64 truth below), with every option, both schedules, both backends, and no [N, V] buffer."""

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import wpkl
import wpkl.backends.projection
import wpkl.engine.chunks
import wpkl.engine.linear

BACKENDS = ("torch", "triton")
# Gradient tolerance relative to the largest |truth|: the logits-gradient is cast to the compute dtype before the
# two gradient GEMMs (TRL's convention) and the result to the parameter's dtype: about one rounding of each.
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1.5e-3}
LOSS_TOL = dict(rtol=2e-5, atol=2e-6)


def make(B=3, T=6, H=16, V=37, H_t=None, V_t=None, dtype=torch.float32, weight_dtype=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    H_t, V_t, weight_dtype = H_t or H + 3, V_t or V, weight_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    return dict(
        student_hidden=rand(B, T, H), student_weight=rand(V, H, scale=1 / math.sqrt(H) * 2, dt=weight_dtype),
        teacher_hidden=rand(B, T, H_t), teacher_weight=rand(V_t, H_t, scale=1 / math.sqrt(H_t) * 2, dt=weight_dtype),
        student_bias=rand(V, dt=weight_dtype) if bias else None, teacher_bias=rand(V_t, dt=weight_dtype) if bias else None,
    )


def _logits64(hidden, weight, bias, scale, cap, compute):
    z = hidden.double() @ weight.to(compute).double().T
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def truth(inputs, *, student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None,
          upstream=None, **kwargs):
    """The float64 truth: the materialized logits (from the same rounded inputs, the weight in the compute dtype
    as the fused path uses it) through weighted_kl_loss's reference backend; loss, stats, the three gradients."""
    compute = inputs["student_hidden"].dtype
    leaves = [None if x is None else x.detach().double().requires_grad_(True)
              for x in (inputs["student_hidden"], inputs["student_weight"].to(compute), inputs["student_bias"])]
    student = _logits64(leaves[0], leaves[1], leaves[2], student_logit_scale, student_softcap, torch.float64)
    teacher = None
    if inputs["teacher_hidden"] is not None:
        V = inputs["student_weight"].shape[0]
        t_bias = inputs["teacher_bias"]
        teacher = _logits64(inputs["teacher_hidden"], inputs["teacher_weight"][:V],
                            None if t_bias is None else t_bias[:V], teacher_logit_scale, teacher_softcap,
                            inputs["teacher_hidden"].dtype)
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k.endswith("logprobs")
                  else v) for k, v in kwargs.items()}
    loss, stats = wpkl.weighted_kl_loss(student, teacher, backend="reference", return_stats=True, **kwargs)
    _backward(loss, upstream)
    return loss.detach(), stats, [None if x is None else x.grad for x in leaves]


def _backward(loss, upstream):
    if loss.requires_grad:
        (loss * (torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype))).sum().backward()


def fused(inputs, backend, upstream=None, **kwargs):
    leaves = {k: (None if inputs[k] is None else inputs[k].clone().requires_grad_(True))
              for k in ("student_hidden", "student_weight", "student_bias")}
    args = dict(inputs, **leaves)
    loss, stats = wpkl.fused_linear_kl_loss(args.pop("student_hidden"), args.pop("student_weight"),
                                            args.pop("teacher_hidden"), args.pop("teacher_weight"), backend=backend,
                                            return_stats=True, **args, **kwargs)
    _backward(loss, upstream)
    return loss.detach(), stats, [None if x is None else x.grad for x in leaves.values()]


def check(inputs, backend, upstream=None, **kwargs):
    got = fused(inputs, backend, upstream=upstream, **kwargs)
    linear_options = {k: kwargs[k] for k in ("student_logit_scale", "teacher_logit_scale", "student_softcap",
                                             "teacher_softcap") if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in linear_options and k != "chunk_size"}
    expected = truth(inputs, upstream=upstream, **linear_options, **rest)
    torch.testing.assert_close(got[0].double(), expected[0], **LOSS_TOL)
    for name in ("divergence", "weight", "teacher_confidence", "teacher_entropy", "student_entropy", "position"):
        torch.testing.assert_close(getattr(got[1], name).double(), getattr(expected[1], name).double(),
                                   equal_nan=True, **LOSS_TOL)
    assert torch.equal(got[1].mask, expected[1].mask)
    compute = inputs["student_hidden"].dtype
    for name, g, t, x in zip(("hidden", "weight", "bias"), got[2], expected[2],
                             (inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"]), strict=True):
        if x is None:
            continue
        assert g is not None and g.dtype == x.dtype and g.shape == x.shape, name
        rtol = max(GRAD_RTOL[compute], GRAD_RTOL[x.dtype])
        scale = float(t.abs().max()) if t.numel() else 0.0
        torch.testing.assert_close(g.double(), t, rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m, name=name: f"{name}: {m}")
    return got


def _mask(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[1] = False  # a fully masked sequence
    mask[0, :2] = True
    return mask


SAMPLED_TOKENS = dict(seed=3)


def _divergence_kwargs(name, inputs, mask):
    B, T = mask.shape
    V = inputs["student_weight"].shape[0]
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    if name == "sampled":
        return dict(divergence="sampled", tokens=tokens)
    if name == "sampled_logprobs":
        inputs["teacher_hidden"] = inputs["teacher_weight"] = inputs["teacher_bias"] = None
        logprobs = -torch.rand(B, T, generator=torch.Generator().manual_seed(4)) * 4
        rollout = -torch.rand(B, T, generator=torch.Generator().manual_seed(5)) * 4
        return dict(divergence="sampled", tokens=tokens, teacher_logprobs=logprobs, rollout_logprobs=rollout)
    if name == "jsd":
        return dict(divergence="jsd", beta=0.3)
    return dict(divergence=name)


COMBINED = wpkl.Weighting(position=wpkl.ExpDecay(3.0), confidence=0.5, disagreement=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd", "sampled", "sampled_logprobs"])
def test_every_divergence_with_biases_scales_softcaps(backend, divergence, small_blocks):
    inputs = make(V=97, V_t=101)
    mask = _mask(3, 6)
    kwargs = _divergence_kwargs(divergence, inputs, mask)
    weighting = COMBINED if divergence != "sampled_logprobs" else wpkl.Weighting(position=wpkl.ExpDecay(3.0),
                                                                                  disagreement=1.0)
    check(inputs, backend, mask=mask, weighting=weighting, temperature=0.7, student_logit_scale=0.8,
          teacher_logit_scale=1.3, student_softcap=3.0, teacher_softcap=5.0, chunk_size=4, **kwargs)


WEIGHTINGS = {
    "none": None,
    "position": wpkl.Weighting(position=wpkl.PositionWindow(0.0, 0.5)),
    "combined": COMBINED,
    "accumulated": wpkl.Weighting(accumulated=0.5),
    "accumulated_raw": wpkl.Weighting(accumulated=2.0, normalize=False, disagreement=0.5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "seq_mean", "none"])
def test_every_weighting_and_reduction(backend, weighting, reduction):
    inputs = make(bias=False)
    mask = _mask(3, 6)
    upstream = torch.randn(3, 6) if reduction == "none" else torch.tensor(1.7)
    token_weights = torch.rand(3, 6) + 0.5 if weighting == "none" else None
    check(inputs, backend, upstream=upstream, mask=mask, weighting=WEIGHTINGS[weighting], reduction=reduction,
          token_weights=token_weights, chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_iw_opd_authors_variants(backend, reduction):
    """PrefixConfidence (log q(y) given: the fused form never computes it) and w_max, in both schedules."""
    inputs = make(bias=False)
    mask = _mask(3, 6)
    token_logprobs = -torch.rand(3, 6, generator=torch.Generator().manual_seed(6)) * 5
    upstream = torch.randn(3, 6) if reduction == "none" else torch.tensor(0.9)
    weighting = wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence(window=3, worst=0.5), accumulated=2.0,
                               w_max=1.5)
    check(inputs, backend, upstream=upstream, mask=mask, weighting=weighting, reduction=reduction,
          teacher_token_logprobs=token_logprobs, chunk_size=4)
    with pytest.raises(ValueError, match="needs log q\\(y\\) of the sampled tokens"):
        fused(inputs, backend, mask=mask, weighting=weighting, tokens=torch.zeros(3, 6, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "fp16", "bf16-hidden-fp32-weight"])
@pytest.mark.parametrize("V,H", [(1, 5), (97, 1), (61, 16)])
def test_dtypes_and_odd_sizes(backend, dtype, weight_dtype, V, H, small_blocks):
    inputs = make(H=H, V=V, V_t=V + 3, dtype=dtype, weight_dtype=weight_dtype)
    # (V = 1: every divergence is 0 up to rounding, so no disagreement weighting, which would weigh that rounding.)
    weighting = wpkl.Weighting(disagreement=1.0) if V > 1 else wpkl.Weighting(position=wpkl.ExpDecay(2.0))
    check(inputs, backend, mask=_mask(3, 6), weighting=weighting, temperature=1.3, chunk_size=4, student_softcap=6.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_packed_input_and_empty_batches(backend):
    inputs = make(bias=False)
    mask = _mask(3, 6)
    check(inputs, backend, mask=mask, num_items_in_batch=torch.tensor(40), chunk_size=3)
    # Packed [N, H] input with positions (two sequences), seq_mean and position weighting.
    flat = {k: (None if v is None else v.reshape(-1, v.shape[-1]) if k.endswith("hidden") else v)
            for k, v in inputs.items()}
    positions = torch.cat([torch.arange(7), torch.arange(11)])
    check(flat, backend, positions=positions, reduction="seq_mean", weighting=wpkl.Weighting(position=wpkl.PowerDecay(1.0)),
          chunk_size=4)
    # Nothing valid: loss 0, zero gradients, no chunk runs.
    got = check(inputs, backend, mask=torch.zeros(3, 6, dtype=torch.bool), weighting=COMBINED)
    assert got[0].item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in got[2] if g is not None)


def _schedule_calls(monkeypatch):
    """Count the projections and the gradient GEMMs, in the forward and the backward pass."""
    calls = {"project": 0, "grad_gemm": 0}
    for name, key in (("project", "project"), ("matmul_fp32", "grad_gemm"), ("addmm_fp32", "grad_gemm")):
        original = getattr(wpkl.engine.linear, name)

        def spy(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(wpkl.engine.linear, name, spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,eager", [
    (dict(weighting=COMBINED), True),  # row-local weights: gradients in the forward pass
    (dict(weighting=wpkl.Weighting(accumulated=0.5), chunk_size=12), True),  # chunks of two whole sequences
    (dict(weighting=wpkl.Weighting(accumulated=0.5), chunk_size=4), False),  # a sequence is longer than a chunk
    (dict(reduction="none"), False),  # per-token losses: the upstream gradient is anyone's
])
def test_schedules_and_gemm_counts(backend, case, eager, monkeypatch):
    """Eager: 2 projections + 2 gradient GEMMs per chunk, all in forward; two-phase: 2 in forward, 2 + 2 in
    backward. Both give the truth."""
    inputs = make(B=3, T=6, bias=False)
    mask = torch.ones(3, 6, dtype=torch.bool)
    case = dict(case)
    chunk_size = case.pop("chunk_size", 5)
    calls = _schedule_calls(monkeypatch)
    leaves = [inputs[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight")]
    loss = wpkl.fused_linear_kl_loss(leaves[0], leaves[1], inputs["teacher_hidden"], inputs["teacher_weight"],
                                     mask=mask, backend=backend, chunk_size=chunk_size, **case)
    n_chunks = -(-18 // chunk_size) if not (eager and "weighting" in case and case["weighting"].accumulated) else 2
    assert calls == {"project": 2 * n_chunks, "grad_gemm": 2 * n_chunks if eager else 0}
    loss.sum().backward()
    assert calls == {"project": (2 if eager else 4) * n_chunks, "grad_gemm": 2 * n_chunks}
    check(inputs, backend, mask=mask, chunk_size=chunk_size, upstream=None if case.get("reduction") != "none" else
          torch.randn(3, 6), **case)


class _Allocations(TorchDispatchMode):
    """Every tensor an aten op returns while active (shape and dtype)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.shapes.append((tuple(x.shape), str(func)))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["eager", "two-phase"])
def test_no_n_by_v_tensor_is_ever_allocated(backend, schedule):
    """No tensor of N * V (or more) elements exists at any point: only [chunk, V] tiles (chunk = 4 of 64 tokens)."""
    B, T, V, H, chunk = 4, 16, 97, 8, 4
    inputs = make(B=B, T=T, H=H, V=V)
    leaves = [inputs[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias")]
    reduction = "mean" if schedule == "eager" else "none"
    with _Allocations() as seen:
        loss, stats = wpkl.fused_linear_kl_loss(
            leaves[0], leaves[1], inputs["teacher_hidden"], inputs["teacher_weight"], student_bias=leaves[2],
            teacher_bias=inputs["teacher_bias"], weighting=COMBINED, reduction=reduction, backend=backend,
            chunk_size=chunk, return_stats=True, divergence="jsd")
        loss.sum().backward()
    N = B * T
    largest = max(seen.shapes, key=lambda s: math.prod(s[0]))
    assert math.prod(largest[0]) < N * V, largest
    # Every tensor with a vocabulary dimension is a weight ([V, H], [V, H_t], [V]) or a tile of at most `chunk` rows.
    tiles = [(shape, op) for shape, op in seen.shapes if V in shape and math.prod(shape) // V not in (1, H, H + 3)]
    assert tiles and all(math.prod(shape) // V <= chunk for shape, _ in tiles), tiles


@pytest.mark.slow
def test_peak_memory_stays_at_the_chunk_budget(tmp_path):
    """Peak RSS at N = 8192, V = 32000 (fp32 [N, V] logits would be 1 GiB each): the fused path stays near the
    chunk budget (64 MiB here), the materialized path does not."""
    import subprocess
    import sys

    script = tmp_path / "peak.py"
    script.write_text('''
import ctypes, re, sys, torch, wpkl
torch.set_num_threads(1)
N, V, H = 8192, 32000, 64
g = torch.Generator().manual_seed(0)
hs, ht = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
ws, wt = torch.randn(V, H, generator=g) / 8, torch.randn(V, H, generator=g) / 8
ws.requires_grad_(True); hs.requires_grad_(True)
def rss(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS")
if sys.argv[1] == "fused":
    loss = wpkl.fused_linear_kl_loss(hs, ws, ht, wt, backend="torch", chunk_size=256)
else:
    loss = wpkl.weighted_kl_loss(hs @ ws.T, (ht @ wt.T).detach(), backend="torch")
loss.backward()
print((rss("VmHWM") - before) / 2**20)
''')
    peaks = {}
    for form in ("fused", "materialized"):
        out = subprocess.run([sys.executable, str(script), form], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[form] = float(out.stdout.split()[-1])
    # The stated formula (wpkl/engine/chunks.py): chunk buffers + float32 accumulators for grad_W, grad_h, grad_b;
    # 32 MiB for the interpreter's own churn. The materialized path holds two [N, V] fp32 logits (2 GiB) and more.
    from wpkl.engine.chunks import chunk_bytes

    N, V, H = 8192, 32000, 64
    formula = chunk_bytes(256, V, H, "torch") + 4 * (V * H + N * H + V)
    assert peaks["fused"] * 2**20 < formula + 32 * 2**20, (peaks, formula / 2**20)
    assert peaks["materialized"] > 2000, peaks


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    inputs = make()
    module = wpkl.FusedLinearWeightedKLLoss(weighting=COMBINED, divergence="jsd", beta=0.2, temperature=0.9,
                                            backend=backend, student_softcap=4.0, chunk_size=5)
    mask = _mask(3, 6)
    got = module(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                 inputs["teacher_weight"], mask=mask, student_bias=inputs["student_bias"],
                 teacher_bias=inputs["teacher_bias"])
    expected = wpkl.fused_linear_kl_loss(
        inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"],
        mask=mask, weighting=COMBINED, divergence="jsd", beta=0.2, temperature=0.9, backend=backend,
        student_bias=inputs["student_bias"], teacher_bias=inputs["teacher_bias"], student_softcap=4.0, chunk_size=5)
    torch.testing.assert_close(got, expected)
    assert "chunk_size=5" in repr(module)


def test_frozen_lm_head_and_frozen_hidden():
    """Only the tensors that require grad get one (a frozen lm_head under LoRA, say)."""
    inputs = make()
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    loss = wpkl.fused_linear_kl_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                     inputs["teacher_weight"], backend="torch")
    loss.backward()
    assert hidden.grad is not None and inputs["student_weight"].grad is None
    with torch.no_grad():
        value = wpkl.fused_linear_kl_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                          inputs["teacher_weight"], backend="torch")
    torch.testing.assert_close(value, loss.detach())


def test_fsdp2_dtensor_weight_is_gathered_once(monkeypatch):
    """An FSDP2 lm_head weight (a DTensor) is gathered once per call; its gradient comes back as a DTensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        inputs = make(bias=False)
        weight = distribute_tensor(inputs["student_weight"].clone(), mesh, [Shard(0)]).requires_grad_(True)
        gathers = []
        original = DTensor.full_tensor
        monkeypatch.setattr(DTensor, "full_tensor", lambda self, **k: gathers.append(1) or original(self, **k))
        loss = wpkl.fused_linear_kl_loss(inputs["student_hidden"], weight, inputs["teacher_hidden"],
                                         inputs["teacher_weight"], backend="torch", chunk_size=4)
        loss.backward()
        assert len(gathers) == 1
        assert isinstance(weight.grad, DTensor)
        plain = inputs["student_weight"].clone().requires_grad_(True)
        wpkl.fused_linear_kl_loss(inputs["student_hidden"], plain, inputs["teacher_hidden"], inputs["teacher_weight"],
                                  backend="torch").backward()
        torch.testing.assert_close(weight.grad.full_tensor(), plain.grad)
    finally:
        dist.destroy_process_group()


GOOD = make(B=2, T=3, H=4, V=10, H_t=6, V_t=12)


def _call(**overrides):
    kwargs = dict(GOOD)
    kwargs.update(overrides)
    return wpkl.fused_linear_kl_loss(kwargs.pop("student_hidden"), kwargs.pop("student_weight"),
                                     kwargs.pop("teacher_hidden"), kwargs.pop("teacher_weight"), **kwargs)


@pytest.mark.parametrize("overrides,error,words", [
    (dict(student_weight=torch.randn(10, 5)), ValueError, "student_weight has hidden size 5 but student_hidden has 4"),
    (dict(teacher_weight=torch.randn(12, 4)), ValueError, "teacher_weight has hidden size 4 but teacher_hidden has 6"),
    (dict(teacher_weight=torch.randn(9, 6)), ValueError, "teacher_weight has vocabulary 9 < the student's 10"),
    (dict(student_weight=torch.ones(10, 4, dtype=torch.long)), TypeError, "student_weight must be float32"),
    (dict(student_weight=torch.randn(10)), ValueError, "student_weight must be an lm_head weight [V, H]"),
    (dict(student_hidden=torch.randn(4)), ValueError, "student_hidden must have shape [B, T, H] or [N, H]"),
    (dict(student_hidden=torch.randn(2, 3, 4).numpy()), TypeError, "student_hidden must be a torch.Tensor"),
    (dict(teacher_hidden=torch.randn(2, 4, 6)), ValueError, "teacher_hidden must have student_hidden's leading"),
    (dict(student_bias=torch.randn(11)), ValueError, "student_bias must have shape [10]"),
    (dict(teacher_bias=torch.randn(10)), ValueError, "teacher_bias must have shape [12]"),
    (dict(teacher_weight=None), ValueError, "teacher_hidden needs teacher_weight"),
    (dict(teacher_hidden=None, teacher_bias=None), ValueError, "teacher_weight and teacher_bias need teacher_hidden"),
    (dict(teacher_hidden=None, teacher_weight=None, teacher_bias=None), ValueError,
     'teacher_hidden may be None only with divergence="sampled"'),
    (dict(student_softcap=0.0), ValueError, "student_softcap must be > 0"),
    (dict(teacher_logit_scale=math.nan), ValueError, "teacher_logit_scale must be finite"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(chunk_size=2.5), ValueError, "chunk_size must be a positive int"),
    # The same named errors as weighted_kl_loss for everything else.
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have the logits' leading shape"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(divergence="sampled", tokens=torch.full((2, 3), 10)), ValueError, "tokens must lie in [0, V)"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be finite and > 0"),
    (dict(weighting=wpkl.Weighting(accumulated=0.5), student_hidden=torch.randn(6, 4),
          teacher_hidden=torch.randn(6, 6)), ValueError, "needs [B, T, V] input"),
])
def test_bad_input(overrides, error, words):
    with pytest.raises(error) as info:
        _call(**overrides)
    assert words in str(info.value), str(info.value)


def test_bad_module_configuration():
    with pytest.raises(ValueError, match="student_softcap must be > 0"):
        wpkl.FusedLinearWeightedKLLoss(student_softcap=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        wpkl.FusedLinearWeightedKLLoss(chunk_size=0)


# ---- the review's cases: extreme weights, float16, double backward, autocast, ZeRO-3, NaN rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(weighting=wpkl.Weighting(position=wpkl.PositionTable((1e-30,)))),
                                    dict(weighting=wpkl.Weighting(), token_weights=torch.full((3, 6), 1e-21)),
                                    dict(weighting=wpkl.Weighting(), token_weights=torch.full((3, 6), 1e20))],
                         ids=["tiny-table", "tiny-token-weights", "huge-token-weights"])
def test_eager_schedule_with_extreme_weight_scales(backend, kwargs):
    """Normalized weights make the truth independent of the weights' scale; the eager schedule's scalar too."""
    check(make(), backend, mask=_mask(3, 6), chunk_size=5, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_runs_two_phase_and_sees_the_loss_scale(backend, monkeypatch):
    """float16 with a GradScaler-like upstream (65536) and a huge num_items_in_batch: the logits-gradient is cast to
    float16 only after the upstream scale is known (the two-phase schedule), so it neither underflows nor flushes."""
    calls = _schedule_calls(monkeypatch)
    inputs = make(dtype=torch.float16, bias=False)
    check(inputs, backend, upstream=torch.tensor(65536.0), mask=_mask(3, 6), num_items_in_batch=torch.tensor(1e6),
          chunk_size=5)
    assert calls["grad_gemm"] > 0 and calls["project"] == 2 * calls["grad_gemm"]  # 6 GEMM-equivalents: two-phase


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_twice_with_retain_graph(backend, reduction):
    inputs = make()
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    loss = wpkl.fused_linear_kl_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                     inputs["teacher_weight"], weighting=COMBINED, reduction=reduction,
                                     backend=backend, chunk_size=5)
    first = torch.autograd.grad(loss.sum() * 3, hidden, retain_graph=True)[0]
    second = torch.autograd.grad(loss.sum() * 3, hidden)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_autocast_compute_dtype_is_kept_for_backward(reduction, monkeypatch):
    """Under autocast the forward projects in bf16; backward (outside autocast) must recompute in bf16 too, or its
    logits disagree with the forward's log-normalizers. Both backends then agree closely."""
    dtypes = []
    original = wpkl.engine.linear.project
    monkeypatch.setattr(wpkl.engine.linear, "project", lambda *a, **k: dtypes.append(a[5]) or original(*a, **k))
    inputs = make(H=32, V=61, bias=False)
    grads = []
    for backend in BACKENDS:
        hidden = inputs["student_hidden"].clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wpkl.fused_linear_kl_loss(hidden, inputs["student_weight"], inputs["teacher_hidden"],
                                             inputs["teacher_weight"], backend=backend, reduction=reduction,
                                             chunk_size=4, student_logit_scale=8.0, teacher_logit_scale=8.0)
        loss.sum().backward()
        grads.append(hidden.grad)
    # 5 chunks of 4 of the 18 tokens, 2 projections each: forward only (eager) or forward and backward (two-phase)
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) == (20 if reduction == "none" else 10) * 2
    # (the logits-gradient is rounded to bf16 before its GEMMs: the backends agree to that rounding)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-2 * grads[1].abs().max().item())


@pytest.mark.parametrize("weighting", [None, wpkl.Weighting(accumulated=0.5)], ids=["eager", "two-phase"])
def test_zero3_weights_are_gathered_again_for_the_two_phase_backward(weighting, monkeypatch):
    """A ZeRO-3-like lm_head (empty outside its gather context, as DeepSpeed re-partitions it): the TRL route
    gathers it for the forward, and the two-phase backward re-enters the gather to recompute the projections."""
    from trl.trainer import utils as trl_utils

    from wpkl.integrations import trl as adapter

    inputs = make(B=2, T=8, V=37, bias=False)
    full = inputs["student_weight"].clone()
    weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # frozen (as under LoRA): the hidden grad only
    gathers = []

    @contextlib.contextmanager
    def gather(*params):
        mine = any(p is weight for p in params)
        if mine:
            gathers.append(1)
            weight.data = full
        try:
            yield
        finally:
            if mine:
                weight.data = torch.empty(0)

    monkeypatch.setattr(trl_utils, "maybe_gather_lm_head_ctx", gather)
    monkeypatch.setattr(wpkl.engine.chunks, "CHUNK_BYTES", wpkl.engine.chunks.chunk_bytes(4, 37, 16, "torch"))
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    loss, _, _ = adapter._distillation_divergence(weighting, "torch")(
        hidden, inputs["teacher_hidden"], weight, inputs["teacher_weight"], torch.ones(2, 8, dtype=torch.long), 1.0)
    loss.backward()
    assert len(gathers) == (1 if weighting is None else 2)
    plain = inputs["student_hidden"].clone().requires_grad_(True)
    wpkl.fused_linear_kl_loss(plain, full, inputs["teacher_hidden"], inputs["teacher_weight"], weighting=weighting,
                              reduction="sum", backend="torch").div(16).backward()
    torch.testing.assert_close(hidden.grad, plain.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_row_leaves_the_other_rows_finite(backend):
    """One NaN hidden state with a divergence-dependent weighting: the loss is NaN, that row's gradient is NaN, the
    other rows' gradients are finite and right (as on materialized logits)."""
    inputs = make(bias=False)
    inputs["student_hidden"][0, 2, 1] = float("nan")
    weighting = wpkl.Weighting(disagreement=1.0, normalize=False)
    got = fused(inputs, backend, weighting=weighting, chunk_size=5)
    _, _, (expected, _, _) = truth(inputs, weighting=weighting)
    finite = torch.isfinite(expected).all(dim=-1)
    assert torch.isnan(got[0]) and not finite[0, 2] and finite.sum() == 17
    torch.testing.assert_close(got[2][0][finite].double(), expected[finite], rtol=1e-4, atol=1e-6)
    assert torch.isnan(got[2][0][0, 2]).all()
