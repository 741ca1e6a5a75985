"""The demo's experiment: train a teacher, warm-start a student, distill on-policy under several weightings.

Every weighting of one seed starts from the same teacher, the same student initialization and sees the
same prompts, so their differences come from the weighting alone. All runs make the same number of updates
of the same batch size; weighted runs normalize their weights to mean 1 (wpkl's default), so the loss scale
matches uniform averaging.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import wpkl
from wpkl.audit import PositionBiasMonitor

from .language import HiddenModeLanguage
from .model import TinyLM


def weightings(new_tokens: int) -> dict[str, wpkl.Weighting | None]:
    return {
        "uniform": None,  # standard OPD: every token counts the same
        "first30": wpkl.Weighting(position=wpkl.PositionWindow(0.0, 0.3)),  # the paper's diagnostic ...
        "last30": wpkl.Weighting(position=wpkl.PositionWindow(0.7, 1.0)),  # ... and its mirror
        "iw_opd": wpkl.Weighting(accumulated=0.5),  # prefix-discrepancy weighting (IW-OPD's, dense)
        "position": wpkl.Weighting(position=wpkl.ExpDecay(new_tokens / 2)),
        "confidence": wpkl.Weighting(confidence=1.0),
        "disagreement": wpkl.Weighting(disagreement=1.0),
    }


@dataclass
class DemoConfig:
    steps: int = 200
    seeds: tuple[int, ...] = (0, 1)
    weightings: tuple[str, ...] = ("uniform", "first30", "last30", "iw_opd", "position", "confidence", "disagreement")
    divergence: str = "reverse_kl"
    batch: int = 32
    prompt_length: int = 6
    new_tokens: int = 24
    lr: float = 2e-3
    teacher_steps: int = 400
    warmup_steps: int = 40
    eval_every: int = 10
    eval_prompts: int = 256
    target_kl: float | None = None  # default: half the warm-started student's KL
    device: str = "cpu"
    teacher_size: dict = field(default_factory=lambda: dict(d_model=64, layers=2, heads=4))
    student_size: dict = field(default_factory=lambda: dict(d_model=32, layers=1, heads=2))


def _lm(lang, cfg, size) -> TinyLM:
    return TinyLM(lang.vocab, max_length=cfg.prompt_length + cfg.new_tokens, **size).to(cfg.device)


def train_mle(model: TinyLM, lang: HiddenModeLanguage, cfg: DemoConfig, steps: int, seed: int, progress=None):
    """Maximum likelihood on samples of the language (the teacher; the student's short warm start)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        seq = lang.sample(64, cfg.prompt_length + cfg.new_tokens, gen).to(cfg.device)
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, lang.vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    return model


def _opd_batch(student, teacher, prompts, cfg, gen):
    """Student rollouts of the prompts, and both models' logits for the continuation tokens."""
    seq = student.generate(prompts, cfg.new_tokens, gen)
    tokens = seq[:, cfg.prompt_length:]
    student_logits = student(seq[:, :-1])[:, cfg.prompt_length - 1:]
    with torch.no_grad():
        teacher_logits = teacher(seq[:, :-1])[:, cfg.prompt_length - 1:]
    return seq, tokens, student_logits, teacher_logits


@torch.no_grad()
def evaluate(student, teacher, lang, prompts, cfg, seed) -> dict:
    """Reverse KL(student || teacher) per token on the student's own samples of held-out prompts, and the true
    log-likelihood of those samples under the language, nats per token."""
    gen = torch.Generator().manual_seed(seed)
    seq, tokens, s_logits, t_logits = _opd_batch(student, teacher, prompts, cfg, gen)
    kl = wpkl.weighted_kl_loss(s_logits, t_logits, divergence="reverse_kl").item()
    true_ll = lang.continuation_log_likelihood(seq, cfg.prompt_length).mean().item()
    return dict(kl=kl, true_ll=true_ll)


def run_opd(name, weighting, teacher, student_init, lang, cfg: DemoConfig, seed: int, eval_prompts,
            progress=None) -> dict:
    student = copy.deepcopy(student_init)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(10_000 + seed)  # the same prompts and sampling noise for every weighting
    monitor = PositionBiasMonitor(num_buckets=8)
    curve = [dict(step=0, **evaluate(student, teacher, lang, eval_prompts, cfg, seed))]
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        prompts = lang.sample(cfg.batch, cfg.prompt_length, gen).to(cfg.device)
        _, tokens, s_logits, t_logits = _opd_batch(student, teacher, prompts, cfg, gen)
        loss, stats = wpkl.weighted_kl_loss(s_logits, t_logits, weighting=weighting, divergence=cfg.divergence,
                                            tokens=tokens, return_stats=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        monitor.update(stats, step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            curve.append(dict(step=step, **evaluate(student, teacher, lang, eval_prompts, cfg, seed)))
        if progress is not None:
            progress.update(1)
    return dict(name=name, seed=seed, curve=curve, seconds=time.perf_counter() - start, monitor=monitor)


def steps_to(curve: list[dict], target: float) -> int | None:
    """The first evaluated step whose KL is at or below the target (None: never within the run)."""
    return next((point["step"] for point in curve if point["kl"] <= target), None)


def run(cfg: DemoConfig, progress_factory=None) -> dict:
    """All seeds x weightings. Returns the results (JSON-able, except the monitors)."""
    table = weightings(cfg.new_tokens)
    unknown = [name for name in cfg.weightings if name not in table]
    if unknown:
        raise ValueError(f"unknown weighting(s) {unknown}; choose from {list(table)}")
    lang = HiddenModeLanguage(seed=1234)
    results = dict(config=asdict(cfg), runs=[], reference={})
    bar = (lambda total, desc: progress_factory(total=total, desc=desc)) if progress_factory else (lambda *a, **k: None)
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        teacher = _lm(lang, cfg, cfg.teacher_size)
        with _closing(bar(cfg.teacher_steps, f"seed {seed}: teacher (MLE)")) as p:
            train_mle(teacher, lang, cfg, cfg.teacher_steps, seed, p)
        teacher.eval()
        student = _lm(lang, cfg, cfg.student_size)
        with _closing(bar(cfg.warmup_steps, f"seed {seed}: student warm start")) as p:
            train_mle(student, lang, cfg, cfg.warmup_steps, seed + 1, p)
        eval_prompts = lang.sample(cfg.eval_prompts, cfg.prompt_length,
                                   torch.Generator().manual_seed(99_000 + seed)).to(cfg.device)
        with torch.no_grad():
            teacher_seq = teacher.generate(eval_prompts, cfg.new_tokens, torch.Generator().manual_seed(seed))
        results["reference"][seed] = dict(
            teacher_true_ll=lang.continuation_log_likelihood(teacher_seq, cfg.prompt_length).mean().item(),
            language_true_ll=lang.continuation_log_likelihood(
                lang.sample(cfg.eval_prompts, cfg.prompt_length + cfg.new_tokens,
                            torch.Generator().manual_seed(7 + seed)), cfg.prompt_length).mean().item(),
        )
        for name in cfg.weightings:
            with _closing(bar(cfg.steps, f"seed {seed}: {name}")) as p:
                results["runs"].append(run_opd(name, table[name], teacher, student, lang, cfg, seed, eval_prompts, p))
    for run_result in results["runs"]:
        initial = run_result["curve"][0]["kl"]
        target = cfg.target_kl if cfg.target_kl is not None else initial / 2
        run_result["target_kl"] = target
        run_result["steps_to_target"] = steps_to(run_result["curve"], target)
    return results


class _closing:
    def __init__(self, bar):
        self.bar = bar

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std
