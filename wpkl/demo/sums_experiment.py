"""The running-sum experiment: does reweighting tokens help on-policy distillation when supervision after a
student's mistake is bad, and does it cost anything when it is not?

Per invocation one teacher (a 2-layer relative-position transformer) is trained on correct sequences until
its greedy answers are all right on held-out prompts. Per seed a student (1 layer) is warm-started by
supervised training, checkpoint by checkpoint, until its *measured* sampled per-step error falls to the drift
level's target; then, for every teacher behaviour (``sums.TeacherWrapper``) and every weighting, a copy of
that student is distilled on-policy: it samples responses to a stream of prompts, the wrapped teacher scores
every response token, and wpkl's loss (dense reverse KL by default) trains it.

Within a seed every run starts from the same student, sees the same prompts and draws the same sampling
noise (the random stream is seeded by the seed alone; the runs differ only through what they learn), so
runs are compared paired by seed. Weighted runs normalize their weights to mean 1 over each batch's tokens
(wpkl's default), so every run makes updates of the same scale; only where the weight goes differs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import wpkl
from wpkl.audit import PositionBiasMonitor

from . import sums
from .model import RelativeLM
from .stats import holm, paired
from .sums_arms import MOPD, ORACLE, arm_loss, second_teacher, weightings

__all__ = ["ORACLE", "weightings"]  # the arms live in sums_arms.py; the CLI and the report import them from here

DRIFT_TARGETS = {"high": 0.10, "low": 0.05}  # the warm start stops at the first checkpoint at or below this error
POSITION_METRICS = ("step_error", "wrong_prefix", "conflict", "kl", "teacher_entropy", "weight")


@dataclass
class SumsConfig:
    steps: int = 150
    seeds: tuple[int, ...] = (0, 1, 2)
    teachers: tuple[str, ...] = ("cons", "rec")
    weightings: tuple[str, ...] = ("uniform", "first30", "iw_opd_0.5", ORACLE)
    k: int = 16
    drift: str = "high"
    divergence: str = "reverse_kl"
    batch: int = 64
    lr: float = 1e-3
    teacher_steps: int = 2000  # at most; training stops once the teacher is right on every held-out prompt
    teacher_seed: int = 1234
    warmup_max_steps: int = 4000
    warmup_lr: float = 2e-3
    eval_every: int = 25
    eval_prompts: int = 256
    eval_samples: int = 4
    threshold: float = 0.8  # updates to reach this accuracy (greedy and sampled)
    device: str = "cpu"
    teacher_size: dict = field(default_factory=lambda: dict(d_model=64, layers=2, heads=4))
    student_size: dict = field(default_factory=lambda: dict(d_model=32, layers=1, heads=2))


def _model(cfg: SumsConfig, size: dict) -> RelativeLM:
    return RelativeLM(sums.VOCAB, max_distance=2 * cfg.k + 4, **size).to(cfg.device)


def _supervised_step(model, opt, cfg: SumsConfig, gen: torch.Generator) -> float:
    """One step of maximum likelihood on correct sequences (the response tokens only)."""
    p = sums.prompt_length(cfg.k)
    seq = sums.full_sequences(sums.sample_prompts(64, cfg.k, gen), cfg.k).to(cfg.device)
    logits = model(seq[:, :-1])[:, p - 1:, :sums.DIGITS]
    loss = F.cross_entropy(logits.reshape(-1, sums.DIGITS), seq[:, p:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def _rollouts(model, prompts, cfg: SumsConfig, gen=None, greedy=False):
    was_training = model.training
    model.eval()
    seq = model.generate(prompts, cfg.k, gen, allowed=sums.DIGITS, greedy=greedy)
    model.train(was_training)
    return seq


def train_teacher(cfg: SumsConfig, progress=None) -> tuple[RelativeLM, dict]:
    """Train until greedy answers are right on all held-out prompts and sampled steps err < 0.2%."""
    torch.manual_seed(cfg.teacher_seed)
    teacher = _model(cfg, cfg.teacher_size)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.teacher_seed)
    held_out = sums.sample_prompts(cfg.eval_prompts, cfg.k, torch.Generator().manual_seed(cfg.teacher_seed + 1))
    info = dict(steps=0, greedy_accuracy=0.0, sampled_step_error=1.0)
    for step in range(1, cfg.teacher_steps + 1):
        _supervised_step(teacher, opt, cfg, gen)
        if progress is not None:
            progress.update(1)
        if step % 50 == 0 or step == cfg.teacher_steps:
            greedy = sums.analyse(_rollouts(teacher, held_out.to(cfg.device), cfg, greedy=True).cpu(), cfg.k)
            sampled = sums.analyse(_rollouts(teacher, held_out.to(cfg.device), cfg,
                                             torch.Generator().manual_seed(step)).cpu(), cfg.k)
            info = dict(steps=step, greedy_accuracy=greedy.correct.float().mean().item(),
                        sampled_step_error=sampled.step_error.float().mean().item())
            if info["greedy_accuracy"] == 1.0 and info["sampled_step_error"] < 0.002:
                break
    teacher.eval()
    return teacher, info


def warm_start(cfg: SumsConfig, seed: int, progress=None) -> tuple[RelativeLM, dict]:
    """Supervised training of a fresh student, stopped at the first checkpoint whose sampled per-step error,
    measured on 128 prompts (checked every 5 steps once the training loss is below 1), is at or below the
    drift level's target. Returns the student and its error measured again on other prompts."""
    target = DRIFT_TARGETS[cfg.drift]
    torch.manual_seed(seed)
    student = _model(cfg, cfg.student_size)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(20_000 + seed)
    probe = sums.sample_prompts(128, cfg.k, torch.Generator().manual_seed(30_000 + seed)).to(cfg.device)
    measured, steps = None, 0
    for steps in range(1, cfg.warmup_max_steps + 1):
        loss = _supervised_step(student, opt, cfg, gen)
        if progress is not None:
            progress.update(1)
        if loss < 1.0 and steps % 5 == 0:
            facts = sums.analyse(_rollouts(student, probe, cfg, torch.Generator().manual_seed(steps)).cpu(), cfg.k)
            measured = facts.step_error.float().mean().item()
            if measured <= target:
                break
    check = sums.sample_prompts(cfg.eval_prompts, cfg.k, torch.Generator().manual_seed(40_000 + seed))
    facts = sums.analyse(_rollouts(student, check.to(cfg.device), cfg, torch.Generator().manual_seed(seed)).cpu(),
                         cfg.k)
    student.eval()
    return student, dict(steps=steps, target=target, probe_step_error=measured,
                         step_error=facts.step_error.float().mean().item(),
                         wrong_prefix=facts.wrong_prefix.float().mean().item(),
                         accuracy=facts.correct.float().mean().item())


@torch.no_grad()
def teacher_agreement(trained, student, prompts: torch.Tensor, cfg: SumsConfig, seed: int) -> dict:
    """How the trained teacher behaves on the warm-started student's own samples: the share of tokens after a
    wrong prefix where its most likely digit is the consistent one (what ``cons`` assumes) or the true one (what
    ``rec`` imposes), and the share of tokens after a right prefix where it is the true digit."""
    seq = _rollouts(student, prompts, cfg, torch.Generator().manual_seed(60_000 + seed))
    predicted = sums.TeacherWrapper(trained, "trained", cfg.k).trained_logits(seq).argmax(-1).cpu()
    facts = sums.analyse(seq.cpu(), cfg.k)
    wrong = facts.wrong_prefix

    def share(hit, where):
        return (hit & where).sum().item() / max(where.sum().item(), 1)

    return dict(wrong_prefix_tokens=int(wrong.sum()), consistent_after_wrong=share(predicted == facts.consistent, wrong),
                true_after_wrong=share(predicted == facts.truth, wrong),
                true_after_right=share(predicted == facts.truth, ~wrong))


class _PositionSums:
    """Per-position sums of the analysis metrics over many batches of [B, K] rollouts."""

    def __init__(self, k: int):
        self.sums = {name: torch.zeros(k, dtype=torch.float64) for name in POSITION_METRICS}
        self.count = 0

    def add(self, facts: sums.Analysis, target: torch.Tensor, kl: torch.Tensor, teacher_entropy: torch.Tensor,
            weight: torch.Tensor | None = None):
        values = dict(step_error=facts.step_error, wrong_prefix=facts.wrong_prefix,
                      conflict=target.cpu() != facts.consistent.cpu(), kl=kl, teacher_entropy=teacher_entropy,
                      weight=torch.ones_like(kl) if weight is None else weight)
        for name, value in values.items():
            self.sums[name] += value.detach().double().cpu().sum(0)
        self.count += facts.step_error.shape[0]

    def means(self) -> dict[str, list[float]]:
        return {name: (value / max(self.count, 1)).tolist() for name, value in self.sums.items()}


@torch.no_grad()
def evaluate(student, teacher: sums.TeacherWrapper, prompts: torch.Tensor, cfg: SumsConfig, seed: int,
             index: int, positions: bool = False) -> dict:
    """Accuracy of the final answer on held-out prompts: greedy, and the mean over ``eval_samples`` samples per
    prompt; per-step error and KL(student || teacher) on the samples (and per-position metrics if asked)."""
    greedy = sums.analyse(_rollouts(student, prompts, cfg, greedy=True).cpu(), cfg.k)
    # The same noise for every run of a seed at the same evaluation.
    gen = torch.Generator().manual_seed(50_000 + 1000 * seed + index)
    seq = _rollouts(student, prompts.repeat(cfg.eval_samples, 1), cfg, gen)
    sampled = sums.analyse(seq.cpu(), cfg.k)
    # KL and the per-position metrics on one sample per prompt (the teacher's pass is the costly part).
    first = seq[:prompts.shape[0]]
    p = sums.prompt_length(cfg.k)
    student_logits = student(first[:, :-1])[:, p - 1:, :sums.DIGITS]
    teacher_logits, info = teacher(first)
    kl, stats = wpkl.weighted_kl_loss(student_logits, teacher_logits, reduction="none", return_stats=True)
    facts = info["analysis"]
    point = dict(greedy=greedy.correct.float().mean().item(), sampled=sampled.correct.float().mean().item(),
                 step_error=sampled.step_error.float().mean().item(), kl=kl.mean().item())
    if positions:
        per_position = _PositionSums(cfg.k)
        per_position.add(facts, info["target"].cpu(), kl, stats.teacher_entropy)
        point["positions"] = per_position.means()
    return point


def run_opd(name: str, teacher: sums.TeacherWrapper, student_init, cfg: SumsConfig, seed: int, eval_prompts,
            progress=None) -> dict:
    weighting = weightings()[name]
    student = copy.deepcopy(student_init).train()
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(10_000 + seed)  # the same prompts and sampling noise for every run
    p = sums.prompt_length(cfg.k)
    monitor = PositionBiasMonitor(num_buckets=6)
    training = _PositionSums(cfg.k)
    curve = [dict(step=0, **evaluate(student, teacher, eval_prompts, cfg, seed, 0, positions=True))]
    other = second_teacher(teacher, cfg.k) if name == MOPD else None
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        prompts = sums.sample_prompts(cfg.batch, cfg.k, gen).to(cfg.device)
        seq = _rollouts(student, prompts, cfg, gen)
        student_logits = student(seq[:, :-1])[:, p - 1:, :sums.DIGITS]
        teacher_logits, info = teacher(seq)
        facts = info["analysis"]
        loss, stats = arm_loss(name, weighting, student_logits, teacher_logits, facts, seq, cfg, other)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        monitor.update(stats, step)
        with torch.no_grad():
            if cfg.divergence == "reverse_kl" and name != MOPD:  # MOPD's stats hold the teachers' mixture
                kl = stats.divergence
            else:
                kl = wpkl.weighted_kl_loss(student_logits.detach(), teacher_logits, reduction="none")
            training.add(facts, info["target"].cpu(), kl, stats.teacher_entropy, stats.weight)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last = step == cfg.steps
            curve.append(dict(step=step, **evaluate(student, teacher, eval_prompts, cfg, seed, step, positions=last)))
        if progress is not None:
            progress.update(1)
    return dict(name=name, teacher=teacher.mode, seed=seed, curve=curve, training_positions=training.means(),
                seconds=time.perf_counter() - start, monitor=monitor)


def area_under(curve: list[dict], key: str) -> float:
    """Mean of the metric over training: the trapezoid area under its curve divided by the number of updates."""
    steps = [point["step"] for point in curve]
    values = [point[key] for point in curve]
    if len(steps) < 2:
        return values[0]
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def updates_to(curve: list[dict], key: str, threshold: float) -> int | None:
    """The first evaluated update at which the metric reaches the threshold (None: never within the run)."""
    return next((point["step"] for point in curve if point[key] >= threshold), None)


def run(cfg: SumsConfig, progress_factory=None) -> dict:
    """The whole grid. Returns the results (JSON-able, except the monitors)."""
    table = weightings()
    unknown = [name for name in cfg.weightings if name not in table]
    if unknown:
        raise ValueError(f"unknown weighting(s) {unknown}; choose from {list(table)}")
    bar = (lambda total, desc: progress_factory(total=total, desc=desc)) if progress_factory else (lambda *a: None)
    results = dict(task="sums", config=asdict(cfg), runs=[], warm_start={})
    with _closing(bar(cfg.teacher_steps, "teacher (supervised, stops when right on all held-out prompts)")) as p:
        trained, results["teacher"] = train_teacher(cfg, p)
    for seed in cfg.seeds:
        with _closing(bar(cfg.warmup_max_steps, f"seed {seed}: student warm start")) as p:
            student, results["warm_start"][seed] = warm_start(cfg, seed, p)
        eval_prompts = sums.sample_prompts(cfg.eval_prompts, cfg.k,
                                           torch.Generator().manual_seed(99_000 + seed)).to(cfg.device)
        results["warm_start"][seed]["teacher"] = teacher_agreement(trained, student, eval_prompts, cfg, seed)
        for mode in cfg.teachers:
            teacher = sums.TeacherWrapper(trained, mode, cfg.k)
            for name in cfg.weightings:
                with _closing(bar(cfg.steps, f"seed {seed}: teacher {mode}, {name}")) as p:
                    results["runs"].append(run_opd(name, teacher, student, cfg, seed, eval_prompts, p))
    for r in results["runs"]:
        r["auc_sampled"] = area_under(r["curve"], "sampled")
        r["auc_greedy"] = area_under(r["curve"], "greedy")
        r["updates_to_threshold"] = {key: updates_to(r["curve"], key, cfg.threshold) for key in ("greedy", "sampled")}
    return results


METRICS = (  # (key, label): compared paired by seed, each arm against uniform
    ("auc_sampled", "area under the sampled-accuracy curve"),
    ("auc_greedy", "area under the greedy-accuracy curve"),
    ("final_sampled", "final sampled accuracy"),
    ("final_greedy", "final greedy accuracy"),
)


def run_metric(r: dict, key: str) -> float:
    if key.startswith("final_"):
        return r["curve"][-1][key.removeprefix("final_")]
    return r[key]


def comparisons(results: dict, baseline: str = "uniform") -> list[dict]:
    """Per teacher, metric and arm: the paired difference arm - baseline over seeds (mean, 95% CI, signs,
    t-test p), with Holm's correction across the arms of that teacher and metric."""
    cfg = results["config"]
    by_key = {(r["teacher"], r["name"], r["seed"]): r for r in results["runs"]}
    rows = []
    for mode in cfg["teachers"]:
        for key, _ in METRICS:
            group = []
            for name in cfg["weightings"]:
                if name == baseline:
                    continue
                seeds = [s for s in cfg["seeds"] if (mode, name, s) in by_key and (mode, baseline, s) in by_key]
                diffs = [run_metric(by_key[(mode, name, s)], key) - run_metric(by_key[(mode, baseline, s)], key)
                         for s in seeds]
                group.append(dict(teacher=mode, metric=key, weighting=name, **paired(diffs)))
            for row, adjusted in zip(group, holm([g["p"] for g in group]), strict=True):
                row["p_holm"] = adjusted
            rows.extend(group)
    return rows


class _closing:
    def __init__(self, bar):
        self.bar = bar

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


POSITION_LABELS = dict(step_error="step error", wrong_prefix="wrong prefix", conflict="teacher target ≠ consistent",
                       kl="KL(student ‖ teacher)", teacher_entropy="teacher entropy", weight="mean weight (training)")


def runs_of(results: dict, teacher: str, name: str) -> list[dict]:
    return [r for r in results["runs"] if r["teacher"] == teacher and r["name"] == name]


def position_means(runs: list[dict], where: str) -> dict[str, list[float]]:
    """Per-position metrics averaged over runs: where = "initial" or "final" (held-out samples), "training"."""
    tables = [r["training_positions"] if where == "training" else r["curve"][0 if where == "initial" else -1].get(
        "positions") for r in runs]
    tables = [t for t in tables if t]
    if not tables:
        return {}
    return {name: [sum(t[name][i] for t in tables) / len(tables) for i in range(len(tables[0][name]))]
            for name in tables[0]}
