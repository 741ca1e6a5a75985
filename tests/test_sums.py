"""The running-sum demo: the task generator, the teacher wrappers, the oracle weights and the statistics helper,
against values computed by hand."""

import math

import pytest
import torch

import wpkl
from wpkl.demo import sums
from wpkl.demo.model import RelativeLM, _Sampler
from wpkl.demo.stats import holm, paired, t_cdf, t_quantile
from wpkl.demo.sums_experiment import area_under, comparisons, updates_to

K = 5
# a = 7 5 9 0 3: true sums 7 2 1 1 4.
PROMPT = [sums.BOS, 7, 5, 9, 0, 3, sums.EQUALS]
RESPONSES = [
    [7, 2, 1, 1, 4],  # all right
    [7, 3, 2, 2, 5],  # wrong at k=2 (2 -> 3), then every step right from its own digit
    [7, 2, 1, 5, 4],  # a wrong digit at k=4, and a wrong step at k=5 that lands on the true answer
    [1, 6, 5, 5, 8],  # wrong at k=1, consistent afterwards
]


def rollouts():
    return torch.tensor([PROMPT + r for r in RESPONSES])


def test_generator_and_exact_sums():
    gen = torch.Generator().manual_seed(0)
    prompts = sums.sample_prompts(50, 8, gen)
    assert prompts.shape == (50, 10)
    assert (prompts[:, 0] == sums.BOS).all() and (prompts[:, -1] == sums.EQUALS).all()
    assert ((prompts[:, 1:-1] >= 0) & (prompts[:, 1:-1] <= 9)).all()
    full = sums.full_sequences(prompts, 8)
    assert full.shape == (50, 18) and torch.equal(full[:, :10], prompts)
    for row in full.tolist():
        total = 0
        for k in range(8):
            total = (total + row[1 + k]) % 10
            assert row[10 + k] == total
    assert sums.true_sums(torch.tensor([[7, 5, 9, 0, 3]])).tolist() == [[7, 2, 1, 1, 4]]


def test_analysis_by_hand():
    facts = sums.analyse(rollouts(), K)
    assert facts.truth.tolist() == [[7, 2, 1, 1, 4]] * 4
    # consistent[k] = (written[k-1] + a_k) % 10, written[0] = 0
    assert facts.consistent.tolist() == [[7, 2, 1, 1, 4], [7, 2, 2, 2, 5], [7, 2, 1, 1, 8], [7, 6, 5, 5, 8]]
    assert facts.step_error.int().tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0, 0]]
    assert facts.wrong_prefix.int().tolist() == [[0, 0, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 1, 1, 1, 1]]
    assert facts.oracle_mask.int().tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    assert facts.correct.tolist() == [True, False, True, False]  # the third lands on 4 by two mistakes


class ConsistentTeacher(torch.nn.Module):
    """A stand-in trained teacher that predicts the consistent digit everywhere (as the trained one does), with
    logits 5 on it and 0 elsewhere, or a fixed wrong digit when ``broken``."""

    def __init__(self, broken=False):
        super().__init__()
        self.broken = broken

    def forward(self, tokens):
        B, T = tokens.shape
        logits = torch.zeros(B, T, sums.VOCAB)
        p = sums.prompt_length(K)
        a = tokens[:, 1:K + 1]
        for k in range(K):  # the logits at position p - 1 + k predict response digit k
            previous = tokens[:, p - 1 + k] if k > 0 else torch.zeros(B, dtype=torch.long)
            digit = torch.full((B,), 9) if self.broken else (previous + a[:, k]) % 10
            logits[torch.arange(B), p - 1 + k, digit] = 5.0
        return logits


@pytest.mark.parametrize("trained", [None, ConsistentTeacher()])
def test_teacher_wrappers_on_correct_and_wrong_prefixes(trained):
    seq = rollouts()
    facts = sums.analyse(seq, K)
    right, other = math.log(0.99), math.log(0.01 / 9)
    results = {mode: sums.TeacherWrapper(trained, mode, K)(seq) for mode in ("cons", "conf", "rec")}
    for b in range(len(RESPONSES)):
        for k in range(K):
            wrong = bool(facts.wrong_prefix[b, k])
            consistent, truth = int(facts.consistent[b, k]), int(facts.truth[b, k])
            expected = {"cons": consistent, "rec": truth if wrong else consistent, "conf": None if wrong else truth}
            if not wrong:
                assert consistent == truth  # a right prefix: the consistent step is the truth
            for mode, (logits, info) in results.items():
                target = expected[mode]
                assert logits.shape == (len(RESPONSES), K, 10)
                if target is None:
                    torch.testing.assert_close(logits[b, k], torch.full((10,), -math.log(10)))
                    assert info["target"][b, k] == -1
                else:
                    want = torch.full((10,), other)
                    want[target] = right
                    torch.testing.assert_close(logits[b, k], want)
                    assert info["target"][b, k] == target
    # Identical on right prefixes, different after wrong ones.
    right_prefix = ~facts.wrong_prefix
    assert torch.equal(results["cons"][0][right_prefix], results["rec"][0][right_prefix])
    assert torch.equal(results["cons"][0][right_prefix], results["conf"][0][right_prefix])
    assert not torch.equal(results["cons"][0], results["rec"][0])


def test_wrapper_follows_the_trained_teacher():
    """cons (and every mode on a right prefix) takes the trained teacher's prediction; rec takes the truth after a
    wrong prefix whatever the trained teacher says; trained returns the teacher's own digit logits."""
    seq = rollouts()
    facts = sums.analyse(seq, K)
    broken = ConsistentTeacher(broken=True)
    _, cons = sums.TeacherWrapper(broken, "cons", K)(seq)
    assert (cons["target"] == 9).all()
    _, rec = sums.TeacherWrapper(broken, "rec", K)(seq)
    assert torch.equal(rec["target"], torch.where(facts.wrong_prefix, facts.truth, 9))
    raw, info = sums.TeacherWrapper(ConsistentTeacher(), "trained", K)(seq)
    assert torch.equal(info["target"], facts.consistent) and raw.max() == 5.0 and raw.shape[-1] == 10
    with pytest.raises(ValueError, match="teacher mode must be one of"):
        sums.TeacherWrapper(None, "kind", K)


def test_oracle_weights():
    """The oracle arm: weight n_valid / n_kept on tokens up to the first wrong digit, 0 after it."""
    seq = rollouts()
    facts = sums.analyse(seq, K)
    student = torch.randn(4, K, 10)
    teacher, _ = sums.TeacherWrapper(None, "rec", K)(seq)
    loss, stats = wpkl.weighted_kl_loss(student, teacher, weighting=wpkl.Weighting(),
                                        token_weights=facts.oracle_mask.float(), return_stats=True)
    kept = facts.oracle_mask.sum().item()  # 5 + 2 + 4 + 1 = 12 of 20
    assert kept == 12
    expected = facts.oracle_mask.double() * 20 / 12
    torch.testing.assert_close(stats.weight.double(), expected)
    torch.testing.assert_close(loss, (stats.weight * stats.divergence).sum() / 20)


def test_cached_generation_matches_full_recompute():
    torch.manual_seed(0)
    model = RelativeLM(sums.VOCAB, d_model=16, layers=2, heads=2, max_distance=20).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    prompts = sums.sample_prompts(64, 6, torch.Generator().manual_seed(1))
    cached = model.generate(prompts, 6, torch.Generator().manual_seed(2), allowed=10)
    full = _Sampler.generate(model, prompts, 6, torch.Generator().manual_seed(2), allowed=10)
    assert torch.equal(cached, full)
    assert torch.equal(model.generate(prompts, 6, greedy=True), _Sampler.generate(model, prompts, 6, greedy=True))


def test_t_distribution_against_tables_and_closed_forms():
    # Two-sided 95% critical values (standard tables).
    for df, value in ((1, 12.706204736174698), (2, 4.302652729749464), (4, 2.7764451051977934),
                      (9, 2.2621571627409915), (29, 2.045229642132703)):
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-9)
        assert t_quantile(0.025, df) == pytest.approx(-value, abs=1e-9)
    for t in (-3.0, -0.4, 0.0, 0.7, 2.5, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        u = t * t / 4
        df4 = 0.5 + 0.375 * (t / math.sqrt(4 * (1 + u))) * 2 * (1 - u / (3 * (1 + u)))
        assert t_cdf(t, 4) == pytest.approx(df4, abs=1e-12)


def test_paired_differences_by_hand():
    got = paired([1.0, 2.0, 6.0])
    sd = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)  # sqrt(7)
    half = 4.302652729749464 * sd / math.sqrt(3)
    t = 3 / (sd / math.sqrt(3))
    assert got["n"] == 3 and got["mean"] == 3.0 and got["sd"] == pytest.approx(sd)
    assert got["ci_low"] == pytest.approx(3 - half) and got["ci_high"] == pytest.approx(3 + half)
    assert got["t"] == pytest.approx(t)
    assert got["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # two-sided, df = 2
    assert (got["positive"], got["negative"]) == (3, 0)
    one = paired([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["ci_low"]) and math.isnan(one["p"])
    flat = paired([-0.2, -0.2])
    assert flat["ci_low"] == flat["ci_high"] == -0.2 and flat["negative"] == 2
    assert paired([0.0, 0.0, 0.0])["p"] == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.2]) == pytest.approx([0.5, 0.4])
    assert holm([0.9, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1 (2 * 0.6), then monotone
    got = holm([0.02, math.nan])
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1])  # NaN is not counted


def test_curve_summaries_by_hand():
    curve = [dict(step=0, a=0.2), dict(step=25, a=0.6), dict(step=50, a=0.8), dict(step=100, a=1.0)]
    assert area_under(curve, "a") == pytest.approx((25 * 0.4 + 25 * 0.7 + 50 * 0.9) / 100)
    assert updates_to(curve, "a", 0.8) == 50 and updates_to(curve, "a", 0.6) == 25
    assert updates_to(curve, "a", 1.01) is None


def test_comparisons_pair_by_seed_and_holm_correct():
    aucs = {("uniform", 0): 0.5, ("uniform", 1): 0.6, ("uniform", 2): 0.4,
            ("a", 0): 0.6, ("a", 1): 0.8, ("a", 2): 0.9,  # + 0.1, 0.2, 0.5
            ("b", 0): 0.4, ("b", 1): 0.6, ("b", 2): 0.3}  # - 0.1, 0, - 0.1
    runs = [dict(teacher="rec", name=name, seed=seed, auc_sampled=v, auc_greedy=v, curve=[dict(sampled=v, greedy=v)])
            for (name, seed), v in aucs.items()]
    results = dict(config=dict(teachers=["rec"], weightings=["uniform", "a", "b"], seeds=[0, 1, 2]), runs=runs)
    rows = {r["weighting"]: r for r in comparisons(results) if r["metric"] == "auc_sampled"}
    a, b = paired([0.1, 0.2, 0.5]), paired([-0.1, 0.0, -0.1])
    for name, ref in (("a", a), ("b", b)):
        for key in ("mean", "ci_low", "ci_high", "p", "positive", "negative"):
            assert rows[name][key] == pytest.approx(ref[key]), (name, key)
    assert [rows["a"]["p_holm"], rows["b"]["p_holm"]] == pytest.approx(holm([a["p"], b["p"]]))
    assert rows["a"]["positive"] == 3 and rows["b"]["negative"] == 2


def test_merge_per_seed_results():
    from wpkl.demo.sums_report import merge

    def part(seed, **config):
        cfg = dict(teachers=["rec"], weightings=["uniform"], seeds=[seed], steps=10, device="cpu", **config)
        return dict(config=cfg, teacher=dict(steps=5), warm_start={seed: dict(step_error=0.1)},
                    runs=[dict(teacher="rec", name="uniform", seed=seed)], seconds=2.0)

    merged = merge([part(3), part(1)])
    assert merged["config"]["seeds"] == [1, 3] and len(merged["runs"]) == 2 and merged["seconds"] == 4.0
    assert set(merged["warm_start"]) == {"1", "3"}
    with pytest.raises(ValueError, match="different configurations: \\['steps'\\]"):
        merge([part(0), part(1, )] + [dict(part(2), config=dict(part(2)["config"], steps=20))])
    with pytest.raises(ValueError, match="a seed appears twice"):
        merge([part(0), part(0)])


@pytest.mark.parametrize("divergence", ["reverse_kl", "sampled"])
def test_every_arm_trains(divergence):
    """Every arm of the demo (the OPD variants included) runs its loss and updates the student; PowerOPD's arm
    refuses a divergence other than "sampled"."""
    from wpkl.demo import sums as sums_task
    from wpkl.demo.sums_arms import POWER, weightings
    from wpkl.demo.sums_experiment import SumsConfig, _model, run_opd

    cfg = SumsConfig(steps=2, k=4, batch=8, eval_every=2, eval_prompts=8, eval_samples=1, divergence=divergence)
    torch.manual_seed(0)
    student = _model(cfg, cfg.student_size)
    teacher = sums_task.TeacherWrapper(None, "cons", cfg.k)  # the truth stands in for the trained teacher
    prompts = sums_task.sample_prompts(cfg.eval_prompts, cfg.k, torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in student.parameters()]
    for name in weightings():
        if name == POWER and divergence != "sampled":
            with pytest.raises(ValueError, match="--divergence sampled"):
                run_opd(name, teacher, student, cfg, 0, prompts)
            continue
        result = run_opd(name, teacher, student, cfg, 0, prompts)
        assert [point["step"] for point in result["curve"]] == [0, 2], name
        assert all(math.isfinite(point["kl"]) for point in result["curve"]), name
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))  # copies were trained
