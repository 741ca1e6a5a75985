"""wpkl.integrations.trl: the drop-in functions return TRL's values and gradients for the same inputs."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import wpkl

pytest.importorskip("trl", reason="trl is not installed")
from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: E402
from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer  # noqa: E402

from wpkl.integrations import trl as adapter  # noqa: E402


def _batch(B=3, T=7, V=45):
    student, teacher = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = -100
    labels[2] = -100
    return student, teacher, labels


def _value_and_grad(fn, student):
    leaf = student.clone().requires_grad_(True)
    out = fn(leaf)
    out.sum().backward()
    return out.detach(), leaf.grad


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_generalized_jsd_loss_matches_trl(reduction, beta, with_labels):
    student, teacher, labels = _batch()
    labels = labels if with_labels else None
    kwargs = dict(labels=labels, beta=beta, temperature=1.5, reduction=reduction)
    expected = _value_and_grad(lambda s: GKDTrainer.generalized_jsd_loss(s, teacher, **kwargs), student)
    got = _value_and_grad(lambda s: adapter.generalized_jsd_loss(s, teacher, **kwargs), student)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("num_items", [17, torch.tensor(23.0)])
def test_generalized_jsd_loss_num_items_in_batch(num_items):
    student, teacher, labels = _batch()
    expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels, 0.5, 1.0, "batchmean", num_items)
    got = adapter.generalized_jsd_loss(student, teacher, labels, 0.5, 1.0, "batchmean", num_items)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_generalized_jsd_loss_weighted():
    student, teacher, labels = _batch()
    weighting = wpkl.Weighting(position=wpkl.ExpDecay(2.0), confidence=1.0)
    got = adapter.generalized_jsd_loss(student, teacher, labels, beta=1.0, weighting=weighting)
    direct = wpkl.weighted_kl_loss(student, teacher, mask=labels != -100, weighting=weighting, divergence="jsd",
                                   beta=1.0)
    torch.testing.assert_close(got, direct)
    assert not torch.allclose(got, adapter.generalized_jsd_loss(student, teacher, labels, beta=1.0))
    # "none" keeps TRL's per-entry terms, each token's row scaled by its weight.
    rows = adapter.generalized_jsd_loss(student, teacher, labels, beta=1.0, reduction="none", weighting=weighting)
    torch.testing.assert_close(rows.sum() / (labels != -100).sum(), direct, rtol=1e-5, atol=1e-6)


def test_top_k_falls_back_to_trl():
    student, teacher, labels = _batch()
    kwargs = dict(labels=labels, beta=0.5, top_k=5, add_tail=True)
    torch.testing.assert_close(adapter.generalized_jsd_loss(student, teacher, **kwargs),
                               IWOPDTrainer.generalized_jsd_loss(student, teacher, **kwargs))
    with pytest.raises(ValueError, match="top_k"):
        adapter.generalized_jsd_loss(student, teacher, weighting=wpkl.Weighting(), **kwargs)


def _trainer_stub(gamma=0.5, epsilon=1e-8, temperature=1.0):
    return SimpleNamespace(temperature=temperature, iw_opd_gamma=gamma, iw_opd_epsilon=epsilon,
                           model=SimpleNamespace(training=True), _metrics=defaultdict(lambda: defaultdict(list)))


@pytest.mark.parametrize("with_rollout", [False, True])
@pytest.mark.parametrize("num_items", [None, 31])
def test_iw_opd_method_matches_trl_with_metrics(with_rollout, num_items):
    student, teacher, labels = _batch()
    tokens = labels.clamp_min(0)
    teacher_lp = torch.log_softmax(teacher / 0.8, -1).gather(-1, tokens[..., None]).squeeze(-1)
    rollout = (torch.log_softmax(student / 0.8, -1).gather(-1, tokens[..., None]).squeeze(-1)
               - 0.1 * torch.rand(3, 7)) if with_rollout else None
    args = (tokens, labels, teacher_lp, rollout, num_items)
    trl_self, wpkl_self = _trainer_stub(epsilon=1e-3, temperature=0.8), _trainer_stub(epsilon=1e-3, temperature=0.8)
    expected = _value_and_grad(lambda s: IWOPDTrainer._compute_iw_opd_loss(trl_self, s, *args), student)
    method = adapter._iw_opd_method(None, "auto")
    got = _value_and_grad(lambda s: method(wpkl_self, s, *args), student)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-7)
    for key, values in trl_self._metrics["train"].items():
        assert wpkl_self._metrics["train"][key] == pytest.approx(values, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("with_rollout", [False, True])
def test_iw_opd_method_with_powered_advantage(with_rollout):
    """sampled_power: PowerOPD's advantage q(y)^alpha - p(y)^alpha inside TRL's IW-OPD loss (TRL's weights over the
    log-ratio |a|, TRL's normalization), by hand in float64."""
    student, teacher, labels = _batch()
    tokens = labels.clamp_min(0)
    teacher_lp = torch.log_softmax(teacher / 0.8, -1).gather(-1, tokens[..., None]).squeeze(-1)
    log_p = torch.log_softmax(student.double() / 0.8, -1).gather(-1, tokens[..., None]).squeeze(-1)
    rollout = (log_p.float() - 0.1 * torch.rand(3, 7)) if with_rollout else None
    stub = _trainer_stub(epsilon=1e-3, temperature=0.8)
    method = adapter._iw_opd_method(None, "auto", sampled_power=5.0)
    got = _value_and_grad(lambda s: method(stub, s, tokens, labels, teacher_lp, rollout, None), student)

    def by_hand(s):
        lp = torch.log_softmax(s / 0.8, -1).gather(-1, tokens[..., None]).squeeze(-1)
        valid = labels != -100
        behaviour = lp.detach() if rollout is None else rollout.double()
        a = torch.where(valid, teacher_lp.double() - behaviour, 0.0).abs()
        w = 1 + 0.5 * (1 - (a.cumsum(-1) - a) / a.sum(-1, keepdim=True).clamp_min(1e-3))
        r = (5 * teacher_lp.double()).exp() - (5 * behaviour).exp()
        return torch.where(valid, -lp * w * r, 0.0).sum() / valid.sum()

    expected = _value_and_grad(by_hand, student.double())
    torch.testing.assert_close(got[0].double(), expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1].double(), expected[1], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="IW-OPD trainer"):
        adapter.use_wpkl(GKDTrainer.__new__(GKDTrainer), sampled_power=5.0)


def test_use_wpkl_rejects_other_objects():
    with pytest.raises(TypeError, match="use_wpkl does not know"):
        adapter.use_wpkl(object())
    with pytest.raises(TypeError, match="weighting must be"):
        adapter.use_wpkl(object(), weighting="uniform")


def _hidden_batch(dtype, weight_dtype, B=2, K=5, H=16, V=37, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, K, H, generator=g).to(dtype)
    ht = torch.randn(B, K, H + 8, generator=g).to(dtype)
    ws = (torch.randn(V, H, generator=g) / 2).to(weight_dtype)
    wt = (torch.randn(V, H + 8, generator=g) / 2).to(weight_dtype)
    bs = torch.randn(V, generator=g).to(weight_dtype) if bias else None
    bt = torch.randn(V, generator=g).to(weight_dtype) if bias else None
    mask = torch.ones(B, K, dtype=torch.long)
    mask[1, 3:] = 0
    return hs, ht, ws, wt, bs, bt, mask


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_divergence_matches_trl(dtype, weight_dtype, beta):
    """TRL's `_chunked_divergence_loss` and wpkl's replacement: loss, entropy sum, count and every gradient,
    including bf16 hidden states with an fp32 lm_head weight and bias (TRL's `test_bf16_hidden_fp32_weight`)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss as trl_loss

    hs, ht, ws, wt, bs, bt, mask = _hidden_batch(dtype, weight_dtype)
    kwargs = dict(student_lm_head_bias=None, teacher_lm_head_bias=bt, student_logit_scale=0.8,
                  teacher_logit_scale=1.1, student_final_logit_softcapping=5.0,
                  teacher_final_logit_softcapping=None, temperature=0.9, num_items_in_batch=torch.tensor(7))
    results = []
    for fn in (trl_loss, adapter._distillation_divergence(None, "torch")):
        leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
        loss, entropy, count = fn(leaves[0], ht, leaves[1], wt, mask, beta,
                                  **dict(kwargs, student_lm_head_bias=leaves[2]))
        loss.backward()
        results.append((loss.detach().float(), entropy.float(), count, *[x.grad.float() for x in leaves]))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, **tol)


def test_use_wpkl_without_trl_says_how_to_install(monkeypatch):
    """Without TRL: an ImportError that names the extra to install, not a bare ModuleNotFoundError."""
    import sys

    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ImportError, match=r'pip install "wpkl\[trl\]"'):
        adapter.use_wpkl(object())


@pytest.mark.parametrize("weighting", [None, wpkl.Weighting(accumulated=0.5, position=wpkl.ExpDecay(2.0))])
def test_distillation_route_never_materializes_logits(weighting, monkeypatch):
    """use_wpkl's DistillationTrainer route computes from hidden states: no [B, K, V] tensor exists."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor):
                    self.seen.append(tuple(x.shape))
            return out

    import wpkl.engine.chunks

    hs, ht, ws, wt, bs, bt, mask = _hidden_batch(torch.float32, torch.float32, B=4, K=8, V=37)
    mask = torch.ones_like(mask)  # every token valid: 32 of them, in chunks of 4
    monkeypatch.setattr(wpkl.engine.chunks, "CHUNK_BYTES", wpkl.engine.chunks.chunk_bytes(4, 37, 16, "torch"))
    fn = adapter._distillation_divergence(weighting, "torch")
    leaf = hs.clone().requires_grad_(True)
    with Shapes() as shapes:
        loss, _, _ = fn(leaf, ht, ws, wt, mask, 0.5, student_lm_head_bias=bs, teacher_lm_head_bias=bt)
        loss.backward()
    assert not [s for s in shapes.seen if 37 in s and math.prod(s) >= 4 * 8 * 37], "materialized [B, K, V]"
