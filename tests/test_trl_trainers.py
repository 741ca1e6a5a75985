"""use_wpkl on real TRL trainers: tiny models, real batches (on-policy generation included), real training steps.

For each trainer (DistillationTrainer, IWOPDTrainer with the IW-OPD and the JSD objectives, GKDTrainer):
- the inputs are captured from ``trainer.train()`` at its first ``compute_loss`` call, i.e. exactly what the
  trainer feeds the loss (its batching, its on-policy generation, its ``num_items_in_batch``);
- ``compute_loss`` with TRL's own code and after ``use_wpkl(trainer)`` give the same loss, the same student gradients
  and the same logged metrics; a weighted ``use_wpkl`` gives another, finite loss;
- a full ``trainer.train()`` step runs through wpkl with a weighting and updates the student.

Everything runs on CPU in float32 with models built from a config and a local tokenizer: nothing is downloaded.
"""

import math

import pytest
import torch

pytest.importorskip("trl", reason="trl is not installed")
pytest.importorskip("datasets", reason="datasets is not installed")

import tiny_trl  # noqa: E402

import wpkl  # noqa: E402
from wpkl.integrations import trl as adapter  # noqa: E402

# transformers 5.x renames gradient checkpointing, which TRL 1.16 turns on by default: library deprecation notices.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")

# name -> (builder, config overrides, the metric keys compute_loss logs)
TRAINERS = {
    "distillation": (tiny_trl.build_distillation, {}, ["entropy"]),
    "iw_opd": (tiny_trl.build_iw_opd, {}, ["iw_opd/mean_advantage", "iw_opd/mean_abs_advantage",
                                            "iw_opd/mean_weight", "iw_opd/min_weight", "iw_opd/max_weight"]),
    # The full-vocabulary divergence objective, here forward KL (loss_top_k=0; TRL's default loss_top_k=1 is its
    # own sparse top-1 path, which use_wpkl leaves alone).
    "iw_opd_jsd": (tiny_trl.build_iw_opd, dict(distillation_objective="jsd", loss_top_k=0, beta=0.0), []),
    "gkd": (tiny_trl.build_gkd, {}, []),
}

WEIGHTING = wpkl.Weighting(position=wpkl.ExpDecay(4.0), disagreement=1.0)
# For IW-OPD the weighting replaces TRL's importance weights: keep them and add a position decay.
IW_OPD_WEIGHTING = wpkl.Weighting(position=wpkl.ExpDecay(4.0), accumulated=0.5)


def _weighting(name):
    return IW_OPD_WEIGHTING if name == "iw_opd" else WEIGHTING


def _unweighted(trainer, name):
    """The weighting use_wpkl(trainer) runs: none, or for IW-OPD TRL's own importance weights."""
    if name != "iw_opd":
        return None
    return wpkl.Weighting(accumulated=trainer.iw_opd_gamma, normalize=False, accumulated_eps=trainer.iw_opd_epsilon)


@pytest.fixture
def wpkl_calls(monkeypatch):
    """The weighting of each call the adapter makes to wpkl's fused loss (to see that a loss went through wpkl)."""
    calls = []
    for name in ("weighted_kl_loss", "fused_linear_kl_loss"):
        fused = getattr(adapter, name)

        def counting(*args, _fused=fused, **kwargs):
            calls.append(kwargs.get("weighting"))
            return _fused(*args, **kwargs)

        monkeypatch.setattr(adapter, name, counting)
    return calls


def _loss_grads_metrics(trainer, model, inputs, num_items_in_batch, metric_keys):
    """compute_loss as the trainer's training_step calls it; the loss, the student's gradients, the new metrics."""
    model.train()
    model.zero_grad(set_to_none=True)
    metrics = trainer._metrics["train"]
    before = {key: len(metrics[key]) for key in metric_keys}
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logged = {key: metrics[key][before[key]:] for key in metric_keys}
    return loss.detach(), grads, logged


def _assert_same_grads(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", list(TRAINERS))
def test_use_wpkl_matches_trl_on_a_real_batch(name, tmp_path, wpkl_calls):
    build, overrides, metric_keys = TRAINERS[name]
    trainer = build(tmp_path, **overrides)
    model, inputs, num_items_in_batch = tiny_trl.capture_loss_call(trainer)
    student = trainer.accelerator.unwrap_model(model)

    expected_loss, expected_grads, expected_metrics = _loss_grads_metrics(
        trainer, model, inputs, num_items_in_batch, metric_keys)
    assert not wpkl_calls
    assert torch.isfinite(expected_loss) and expected_loss.abs() > 0
    # Every student parameter gets a gradient (the embeddings, the layer, the head).
    assert "lm_head.weight" in expected_grads and len(expected_grads) == sum(
        p.requires_grad for p in student.parameters())

    adapter.use_wpkl(trainer)
    loss, grads, metrics = _loss_grads_metrics(trainer, model, inputs, num_items_in_batch, metric_keys)
    assert wpkl_calls == [_unweighted(trainer, name)], "compute_loss did not go through wpkl"
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
    _assert_same_grads(grads, expected_grads)
    for key in metric_keys:
        assert len(metrics[key]) == len(expected_metrics[key]) == 1, key
        assert metrics[key][0] == pytest.approx(expected_metrics[key][0], rel=1e-5, abs=1e-6), key

    if name == "iw_opd":
        # TRL's IW-OPD weights, spelled out as a wpkl Weighting, are the default.
        adapter.use_wpkl(trainer, weighting=_unweighted(trainer, name))
        loss, grads, _ = _loss_grads_metrics(trainer, model, inputs, num_items_in_batch, [])
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)
        _assert_same_grads(grads, expected_grads)

    # Re-applying use_wpkl with a weighting replaces the unweighted loss.
    adapter.use_wpkl(trainer, weighting=_weighting(name))
    assert trainer.wpkl_weighting == _weighting(name)
    weighted, grads, _ = _loss_grads_metrics(trainer, model, inputs, num_items_in_batch, [])
    assert wpkl_calls[-1] == _weighting(name)
    assert torch.isfinite(weighted)
    assert not torch.isclose(weighted, expected_loss, rtol=1e-3, atol=0), (weighted, expected_loss)
    assert grads.keys() == expected_grads.keys()
    assert all(torch.isfinite(g).all() for g in grads.values())

    # And use_wpkl without a weighting gives TRL's loss back.
    adapter.use_wpkl(trainer)
    loss, _, _ = _loss_grads_metrics(trainer, model, inputs, num_items_in_batch, [])
    assert wpkl_calls[-1] == _unweighted(trainer, name)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAINERS))
def test_train_step_through_wpkl(name, tmp_path, wpkl_calls):
    build, overrides, _ = TRAINERS[name]
    trainer = adapter.use_wpkl(build(tmp_path, **overrides), weighting=_weighting(name))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    result = trainer.train()

    assert trainer.state.global_step == 1
    assert len(wpkl_calls) == 1 and wpkl_calls[0] == _weighting(name), "the training loss did not go through wpkl"
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 1 and math.isfinite(logged[0])
    assert math.isfinite(result.training_loss)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no student parameter changed"
