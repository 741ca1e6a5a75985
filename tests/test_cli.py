"""The `wpkl` command line: --version, defaults in --help, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest

import wpkl
from wpkl import cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "wpkl.cli", *args], capture_output=True, text=True, timeout=300)


def test_version():
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"wpkl {wpkl.__version__}"


@pytest.mark.parametrize("command", [[], ["audit"], ["demo"]])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    if command == ["demo"]:
        for default in ("sums", "wpkl-demo", "auto", "reverse_kl", "cons,rec", "16", "high", "4000"):
            assert f"(default: {default})" in out, default
        # Task-dependent defaults are spelled out for both tasks.
        for words in ("(default: 150; hmm: 200)", "(default: 3; hmm: 2)", "hmm: 400",
                      "(default: uniform,first30,iw_opd_0.5,oracle; hmm: all)"):
            assert words in out, words
    elif command == ["audit"]:
        assert "--out OUT" in out and "(default: None)" not in out
    else:
        assert "--version" in out


@pytest.mark.parametrize("args,words", [
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--steps", "-1"], "--steps must be >= 1, got -1"),
    (["--teacher-steps", "-3"], "--teacher-steps must be >= 0"),
    (["--target-kl", "0"], "--target-kl must be > 0"),
    (["--weighting", "foo"], "unknown weighting 'foo'; choose from uniform"),
    (["--weighting", "uniform,bar"], "unknown weighting 'bar'"),
    (["--weighting", ","], "unknown weighting"),
    (["--task", "hmm", "--weighting", "oracle"], "unknown weighting 'oracle'; choose from uniform"),
    (["--teacher", "cons,nice"], "unknown teacher 'nice'; choose from cons, conf, rec, trained"),
    (["--k", "1"], "--k must be in [2, 64], got 1"),
    (["--warmup-steps", "0"], "--warmup-steps must be >= 1"),
    (["--eval-prompts", "0"], "--eval-prompts must be >= 1"),
    (["--target-kl", "0.1"], "--target-kl applies to --task hmm only"),
])
def test_demo_bad_arguments_are_one_line_errors(args, words, capsys, tmp_path):
    assert cli.main(["demo", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wpkl demo: error: ") and words in err[0], err
    assert not (tmp_path / "x").exists()


def test_demo_cuda_without_cuda(capsys, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["demo", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wpkl demo: error: --device cuda, but CUDA is not available here (use --device cpu or auto)"]


def test_demo_without_matplotlib_claims_no_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "demo"
    code = cli.main(["demo", "--steps", "1", "--teacher-steps", "2", "--warmup-steps", "2", "--eval-prompts", "8",
                     "--seeds", "1", "--teacher", "rec", "--weighting", "uniform", "--device", "cpu", "--no-progress",
                     "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert ".png" not in captured.out and "curves" not in captured.out and "plots" not in captured.out
    assert not list(out.rglob("*.png"))
    assert (out / "summary.md").exists() and (out / "results.json").exists()
