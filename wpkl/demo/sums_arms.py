"""The arms of the running-sum experiment (sums_experiment.py): each arm's weighting and how it calls wpkl."""

from __future__ import annotations

import wpkl

from . import sums

ORACLE = "oracle"
EOPD, POWER, MOPD = "eopd", "power_opd", "mopd"  # arms that change the loss, not the weights


def weightings() -> dict[str, wpkl.Weighting | None]:
    """The arms. ``oracle`` is special: weight 1 while the student's prefix is still right, 0 after it first goes
    wrong, normalized to mean 1 (the ceiling for any reweighting that looks at the prefix)."""
    return {
        "uniform": None,  # standard OPD
        "first30": wpkl.Weighting(position=wpkl.PositionWindow(0.0, 0.3)),  # the paper's diagnostic ...
        "last30": wpkl.Weighting(position=wpkl.PositionWindow(0.7, 1.0)),  # ... and its mirror
        "iw_opd_0.5": wpkl.Weighting(accumulated=0.5),  # IW-OPD, gamma 0.5 (TRL's default; the authors' w_max 1.5)
        "iw_opd_2": wpkl.Weighting(accumulated=2.0),  # IW-OPD, gamma 2
        "prefix_conf": wpkl.Weighting(prefix_confidence=wpkl.PrefixConfidence()),  # the authors' windowed variant
        ORACLE: wpkl.Weighting(),  # with token_weights = the oracle mask
        # the OPD variants (docs/recipes.md, "OPD variants"), normalized to mean 1 like the other arms
        "pw_opsd": wpkl.Weighting(position=wpkl.PositionSigmoid()),  # PW-OPSD's rising schedule
        "tip": wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5)),  # TIP: the important half of the tokens
        EOPD: None,  # wpkl.entropy_gated_loss: + forward KL where the teacher's entropy >= 0.8 nats
        POWER: None,  # PowerOPD's advantage (divergence "sampled" only): sampled_power = 5
        MOPD: None,  # wpkl.multi_teacher_loss: the run's teacher and a second one (second_teacher), 1/2 each
    }


def _loss_inputs(name: str, weighting, facts: sums.Analysis, divergence: str) -> dict:
    if name == ORACLE:
        return dict(weighting=weighting, token_weights=facts.oracle_mask.float())
    if name == POWER:
        if divergence != "sampled":
            raise ValueError(f'the {POWER} arm is PowerOPD\'s sampled-token advantage: run it with --divergence sampled')
        return dict(weighting=None, sampled_power=5.0)
    return dict(weighting=weighting)


def second_teacher(teacher: sums.TeacherWrapper, k: int) -> sums.TeacherWrapper:
    """The ``mopd`` arm's other teacher: the recovering one (``rec``: back to the truth after a wrong prefix), or
    the consistent one when the run's teacher is ``rec`` itself."""
    return sums.TeacherWrapper(teacher.trained, "rec" if teacher.mode != "rec" else "cons", k)


def arm_loss(name: str, weighting, student_logits, teacher_logits, facts: sums.Analysis, seq, cfg, other=None):
    """(loss, stats) of one arm on one batch of rollouts ``seq`` (``other``: the MOPD arm's second teacher)."""
    options = dict(divergence=cfg.divergence, tokens=sums.response(seq, cfg.k), return_stats=True, backend="torch",
                   **_loss_inputs(name, weighting, facts, cfg.divergence))
    if name == EOPD:
        loss, stats, _ = wpkl.entropy_gated_loss(student_logits, teacher_logits, threshold=0.8, **options)
        return loss, stats
    if name == MOPD:
        return wpkl.multi_teacher_loss(student_logits, teachers=[teacher_logits, other(seq)[0]], mixing=[0.5, 0.5],
                                       **options)
    return wpkl.weighted_kl_loss(student_logits, teacher_logits, **options)
