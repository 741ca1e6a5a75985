"""wpkl.testing: the harness passes correct losses, fails wrong ones (half-precision softmax, NaN from -inf,
padded teacher columns, wrong normalization, a planted wrong gradient), never raises on a bad fn, and its
strategies produce what they document; ``wpkl check`` fails when a kernel's gradient is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

import wpkl
from wpkl.testing import CASE_NAMES, assert_loss_correct, check_loss
from wpkl.testing import strategies as opd
from wpkl.testing.cases import select

FAST = [c for c in CASE_NAMES if c != "long_rows"]


def kl_fp32(student, teacher, mask, temperature=1.0):
    """A correct reverse KL accumulating in float32 (safe at -inf logits)."""
    V = student.shape[-1]
    lp = torch.log_softmax(student.float() / temperature, -1)
    lq = torch.log_softmax(teacher[..., :V].float() / temperature, -1)
    p = lp.exp()
    kl = (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1)
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp_min(1)


def kl_half_softmax(student, teacher, mask):
    """Liger #1432: the softmax in the logits' (half) precision, then float32."""
    V = student.shape[-1]
    lp, lq = torch.log_softmax(student, -1), torch.log_softmax(teacher[..., :V], -1)
    p = lp.exp()
    kl = (p * torch.where(p > 0, lp - lq, 0.0)).float().sum(-1)
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp_min(1)


def test_a_float32_loss_passes_every_case_and_dtype():
    report = assert_loss_correct(kl_fp32, quick=True)
    on_cpu = [c.name for c in select(None, cuda=False, quick=True)]  # every case but the CUDA-only production one
    assert "production" not in on_cpu and len(on_cpu) == len(CASE_NAMES) - 1
    assert [r.case for r in report.results] == [c for c in on_cpu for _ in range(3)]
    assert not any(r.skipped for r in report.results)
    assert "passed" in str(report)


def test_wpkl_itself_passes():
    fn = lambda s, t, m, temperature=1.0: wpkl.weighted_kl_loss(s, t, mask=m, temperature=temperature)  # noqa: E731
    report = check_loss(fn, quick=True, cases=FAST)
    assert report.passed, str(report)
    skipped = {r.case for r in report.results if r.skipped}
    assert skipped == {"production"} and all("CUDA" in r.message for r in report.results if r.skipped)


@pytest.mark.parametrize("fn,case,words", [
    (kl_half_softmax, "random", "the loss is off"),
    (lambda s, t, m: kl_fp32(s, t, m) * 1.001, "random", "the loss is off"),  # a small systematic error
    (kl_fp32, "padded_teacher_vocab", None),  # the control: slicing the first V columns passes
    (lambda s, t, m: kl_fp32(s, torch.cat([t[..., 9:], t[..., :9]], -1)[..., :s.shape[-1]], m),
     "padded_teacher_vocab", "off"),  # the wrong columns of a padded teacher
    (lambda s, t, m: (kl_fp32(s, t, m) * m.sum().clamp_min(1)) / m.numel(), "masking", "off"),  # counts padding
])
def test_wrong_losses_fail(fn, case, words):
    report = check_loss(fn, cases=[case])
    if words is None:  # the control: the correct loss on this case
        assert report.passed, str(report)
        return
    assert not report.passed and any(words in r.message for r in report.failures), str(report)


def test_nan_from_banned_tokens_fails():
    def naive(student, teacher, mask):  # p (log p - log q) with -inf - -inf = NaN (TRL #5594)
        V = student.shape[-1]
        lp, lq = torch.log_softmax(student.float(), -1), torch.log_softmax(teacher[..., :V].float(), -1)
        return torch.where(mask, (lp.exp() * (lp - lq)).sum(-1), 0.0).sum() / mask.sum().clamp_min(1)

    report = check_loss(naive, cases=["banned_token"], dtypes=(torch.float32,))
    assert not report.passed and "not finite" in report.failures[0].message


def test_a_planted_wrong_gradient_fails():
    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01  # 1% off

    report = check_loss(lambda s, t, m: kl_fp32(Wrong.apply(s), t, m), cases=["random"])
    assert not report.passed and all("gradient is off" in r.message for r in report.failures)


@pytest.mark.parametrize("fn,words", [
    (lambda s, t, m: 1 / 0, "fn raised ZeroDivisionError"),
    (lambda s, t, m: kl_fp32(s, t, m) * float("nan"), "not finite"),
    (lambda s, t, m: kl_fp32(s.detach(), t, m), "no gradient"),
    (lambda s, t, m: kl_fp32(s, t, m).reshape(1, 1), None),  # a one-element loss is a scalar
    (lambda s, t, m: torch.zeros(3), "shape"),
])
def test_a_bad_fn_is_a_failed_result_never_an_exception(fn, words):
    report = check_loss(fn, cases=["random"], dtypes=(torch.float32,))
    if words is None:
        assert report.passed, str(report)
    else:
        assert not report.passed and words in report.failures[0].message, str(report)
        with pytest.raises(AssertionError, match="does not match"):
            assert_loss_correct(fn, cases=["random"], dtypes=(torch.float32,))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    def fn(s, t, m):
        V = s.shape[-1]
        lp, lq = torch.log_softmax(s.float(), -1), torch.log_softmax(t[..., :V].float(), -1)
        p = lp.exp()
        kl = torch.where(m, (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1), 0.0)
        return kl if reduction == "none" else kl.sum()

    assert check_loss(fn, reduction=reduction, cases=FAST).passed
    assert not check_loss(fn, reduction="mean", cases=["random"]).passed  # the wrong reduction is caught


def test_temperature_case_runs_when_fn_takes_it():
    report = check_loss(kl_fp32, cases=["temperature"])
    assert report.passed and not any(r.skipped for r in report.results)
    one_sided = lambda s, t, m, temperature=1.0: kl_fp32(s / temperature, t, m)  # noqa: E731
    assert not check_loss(one_sided, cases=["temperature"]).passed
    assert check_loss(lambda s, t, m: kl_fp32(s, t, m), cases=["temperature"]).results[0].skipped


def test_unknown_case_is_an_error():
    with pytest.raises(ValueError, match="unknown case"):
        check_loss(kl_fp32, cases=["nope"])


@settings(max_examples=20, deadline=None)
@given(batch=opd.batches(banned=True))
def test_strategies_produce_what_they_document(batch):
    B, T, V = batch.student.shape
    assert batch.teacher.shape[:2] == (B, T) and batch.teacher.shape[-1] >= V
    assert batch.mask.shape == (B, T) and batch.mask.dtype == torch.bool
    banned = torch.isinf(batch.student)
    assert torch.equal(banned, torch.isinf(batch.teacher[..., :V])) and not banned.all(-1).any()
    assert torch.equal(batch.positions[batch.mask], (batch.mask.long().cumsum(-1) - 1)[batch.mask])


@settings(max_examples=20, deadline=None)
@given(data=opd.topk_teachers((2, 3), vocab=11))
def test_topk_strategy(data):
    ids, logprobs = data
    for row_ids in ids.reshape(-1, ids.shape[-1]):
        real = row_ids[row_ids >= 0]
        assert real.numel() >= 1 and real.unique().numel() == real.numel() and (real < 11).all()
    assert (logprobs[ids >= 0] <= 0).all() and torch.logsumexp(logprobs.where(ids >= 0, -torch.inf), -1).le(1e-9).all()


@pytest.mark.slow
def test_wpkl_check_quick_passes_and_writes_json(tmp_path):
    """The README's CPU command, word for word, in a fresh folder (about 75 s on 2 cores, every dtype)."""
    import os
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (words,) = [line.split("#")[0].split() for line in readme.splitlines()
                if line.startswith("wpkl check") and "--quick" in line]
    result = subprocess.run([sys.executable, "-m", "wpkl.cli", *words[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=900, env=dict(os.environ))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import re

    assert re.search(r"\n(\d+) of \1 routes passed", result.stdout), result.stdout[-3000:]
    data = json.loads((tmp_path / words[-1]).read_text())
    assert data["environment"]["torch"] == torch.__version__ and all(r["passed"] for r in data["results"])
    names = {r["route"] for r in data["results"]}
    assert {"torch reverse_kl", "torch sampled", "torch top-k raw", "torch fused-linear"} <= names


def test_wpkl_check_fails_on_a_planted_kernel_bug(monkeypatch, capsys):
    """A wrong gradient in a vocabulary pass (the torch pass's backward scaled by 1.01) makes its routes fail and
    the command exit 1."""
    import wpkl.backends.torch_pass as torch_pass
    from wpkl.cli import main

    original = torch_pass.TorchPass.backward

    def wrong(saved, coef, out):
        return original(saved, coef * 1.01, out)

    monkeypatch.setattr(torch_pass.TorchPass, "backward", staticmethod(wrong))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # no re-run in a subprocess: the planted bug stays
    monkeypatch.setattr("wpkl.engine.route.triton_installed", lambda: False)  # the torch routes only (fast)
    code = main(["check", "--device", "cpu", "--quick", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out, out
    assert "torch reverse_kl" in out and "routes passed" in out


def test_docs_name_every_case_and_the_readme_commands_parse():
    from pathlib import Path

    from wpkl.cli.main import parser

    root = Path(__file__).resolve().parent.parent
    design = (root / "docs" / "design.md").read_text()
    assert all(f"`{name}`" in design for name in CASE_NAMES)
    readme = (root / "README.md").read_text()
    lines = [line.split("#")[0].split() for line in readme.splitlines() if line.startswith("wpkl check")]
    assert len(lines) == 2 and ["wpkl", "check", "--quick", "--json", "check.json"] in lines
    for words in lines:
        args = parser().parse_args(words[1:])
        assert args.handler.__module__ == "wpkl.cli.check"
