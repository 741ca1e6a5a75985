"""``wpkl demo``: run an experiment and write its report (table, plots, position-bias monitors) under --out.

``--task sums`` (the default) is the running-sum experiment (sums_experiment.py); ``--task hmm`` the earlier
hidden-Markov-model language (experiment.py), where supervision after a drifted prefix stays good.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..demo import sums
from ..demo.experiment import DemoConfig
from ..demo.experiment import weightings as hmm_weightings
from ..demo.sums_experiment import DRIFT_TARGETS, SumsConfig
from ..demo.sums_experiment import weightings as sums_weightings
from .errors import CommandError

SUMS, HMM = SumsConfig(), DemoConfig()
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled")


def add_parser(commands, formatter_class=None) -> None:
    parser = commands.add_parser(
        "demo", help="a small on-policy distillation experiment (CPU, a few minutes)",
        description="Distill a small student on-policy from a teacher under several token weightings (same "
                    "seeds, prompts and sampling noise) and report how the weightings compare. The default task is "
                    "a running sum with a scratchpad, where an early mistake makes later digits wrong and the "
                    "teacher's behaviour after a mistake is set by construction; --task hmm is a synthetic "
                    "language where it does not matter.",
        **({} if formatter_class is None else dict(formatter_class=formatter_class)))
    parser.add_argument("--task", default="sums", choices=("sums", "hmm"), help="which experiment")
    parser.add_argument("--weighting", default=None,
                        help=f"comma-separated weightings (default: {','.join(SUMS.weightings)}; hmm: all). "
                             f"sums: {', '.join(sums_weightings())}; hmm: {', '.join(hmm_weightings(24))}")
    parser.add_argument("--teacher", default=",".join(SUMS.teachers),
                        help=f"sums: comma-separated teacher behaviours after a wrong prefix, from "
                             f"{', '.join(sums.TEACHER_MODES)}")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"on-policy updates per run (default: {SUMS.steps}; hmm: {HMM.steps})")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"number of seeds 0, 1, ... (default: {len(SUMS.seeds)}; hmm: {len(HMM.seeds)})")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="sums: the first seed (seeds first, first + 1, ...; merge the results of several "
                             "invocations with python -m wpkl.demo.sums_report)")
    parser.add_argument("--k", type=int, default=SUMS.k, help="sums: digits per prompt and response (16, 24, 32)")
    parser.add_argument("--drift", default=SUMS.drift, choices=tuple(DRIFT_TARGETS),
                        help="sums: the student's warm-start sampled per-step error target "
                             f"({', '.join(f'{k}: {v:.0%}%' for k, v in DRIFT_TARGETS.items())})")
    parser.add_argument("--divergence", default="reverse_kl", choices=DIVERGENCES, help="the per-token divergence")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help=f"teacher training steps (default: at most {SUMS.teacher_steps}, stopping when it is "
                             f"right on every held-out prompt; hmm: {HMM.teacher_steps})")
    parser.add_argument("--warmup-steps", type=int, default=SUMS.warmup_max_steps,
                        help="sums: at most this many supervised steps to warm-start the student")
    parser.add_argument("--eval-prompts", type=int, default=None,
                        help=f"held-out prompts per evaluation (default: {SUMS.eval_prompts}; hmm: {HMM.eval_prompts})")
    parser.add_argument("--target-kl", type=float, default=None,
                        help="hmm: the KL to reach (default: half the warm-started student's KL)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: CUDA when present, else the CPU")
    parser.add_argument("--out", default="wpkl-demo", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=main)


def _names(text: str, known, what: str, error) -> tuple[str, ...]:
    chosen = tuple(w.strip() for w in text.split(",") if w.strip())
    unknown = [w for w in chosen if w not in known]
    if unknown or not chosen:
        raise error(f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; choose from {', '.join(known)}")
    return chosen


def _checked(args):
    """The arguments as a SumsConfig or DemoConfig, or a CommandError (one line, exit code 2) naming the bad one."""
    import torch

    for name in ("seeds", "steps", "eval_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.teacher_steps is not None and args.teacher_steps < 0:
        raise CommandError(f"--teacher-steps must be >= 0, got {args.teacher_steps}")
    if args.target_kl is not None and not args.target_kl > 0:
        raise CommandError(f"--target-kl must be > 0, got {args.target_kl}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda, but CUDA is not available here (use --device cpu or auto)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.task == "hmm":
        chosen = _names(args.weighting or ",".join(HMM.weightings), hmm_weightings(HMM.new_tokens), "weighting",
                        CommandError)
        return DemoConfig(steps=args.steps or HMM.steps, seeds=tuple(range(args.seeds or len(HMM.seeds))),
                          weightings=chosen, divergence=args.divergence,
                          teacher_steps=HMM.teacher_steps if args.teacher_steps is None else args.teacher_steps,
                          target_kl=args.target_kl, eval_prompts=args.eval_prompts or HMM.eval_prompts, device=device)
    if args.target_kl is not None:
        raise CommandError("--target-kl applies to --task hmm only")
    if not 2 <= args.k <= 64:
        raise CommandError(f"--k must be in [2, 64], got {args.k}")
    if args.warmup_steps < 1:
        raise CommandError(f"--warmup-steps must be >= 1, got {args.warmup_steps}")
    chosen = _names(args.weighting or ",".join(SUMS.weightings), sums_weightings(), "weighting", CommandError)
    teachers = _names(args.teacher, sums.TEACHER_MODES, "teacher", CommandError)
    if "power_opd" in chosen and args.divergence != "sampled":
        raise CommandError("the power_opd arm is PowerOPD's sampled-token advantage: add --divergence sampled")
    if args.first_seed < 0:
        raise CommandError(f"--first-seed must be >= 0, got {args.first_seed}")
    seeds = tuple(range(args.first_seed, args.first_seed + (args.seeds or len(SUMS.seeds))))
    return SumsConfig(steps=args.steps or SUMS.steps, seeds=seeds,
                      teachers=teachers, weightings=chosen, k=args.k, drift=args.drift, divergence=args.divergence,
                      teacher_steps=SUMS.teacher_steps if args.teacher_steps is None else args.teacher_steps,
                      warmup_max_steps=args.warmup_steps, eval_prompts=args.eval_prompts or SUMS.eval_prompts,
                      device=device)


def _progress(disabled: bool):
    if disabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda total, desc: tqdm(total=total, desc=desc, leave=False, file=sys.stderr)


def main(args) -> int:
    import torch

    cfg = _checked(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.device == "cpu":
        # Tiny models: one thread avoids the cost of splitting small operations (3x faster on 2 busy cores).
        torch.set_num_threads(1)
    start = time.perf_counter()
    if isinstance(cfg, SumsConfig):
        from ..demo import sums_experiment as experiment
        from ..demo import sums_report as report
        written = "summary.md, results.json, runs/ (position-bias monitors)"
        plots = ", curves.png, differences.png, positions.png and audit/ (plots)"
    else:
        from ..demo import experiment
        from ..demo import hmm_report as report
        written = "summary.md, results.json, runs/ (position-bias monitors)"
        plots = ", curves.png and audit/ (plots)"
    results = experiment.run(cfg, _progress(args.no_progress))
    elapsed = time.perf_counter() - start
    plotted = report.write_report(results, out, elapsed)
    print((out / "summary.md").read_text())
    print(f"\nwrote {written}{plots if plotted else ''} under {out} (in {elapsed:.0f} s)")
    return 0
