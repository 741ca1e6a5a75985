"""wpkl inside verl 0.9.1's distillation trainer, against verl's own functions (the real package, on the CPU).

verl pins transformers < 5.11 and the main environment has transformers >= 5.25 (TRL 1.16's), so CI runs this
file in a second environment (.ci/run); here it skips when verl is not installed. Each case builds a micro-batch
as verl's FSDP engine does (nested jagged prompts, responses and top-k teacher data over the whole sequences,
the logits processor's outputs nested by the sequences' offsets), runs verl's logits processor and its
``distillation_loss`` with real ``ActorConfig`` / ``DistillationConfig`` objects, then the same with
``use_wpkl``, and compares values, metrics' inputs and gradients.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from utils import free_port, leave_worker

if os.environ.get("WPKL_REQUIRE_VERL"):  # CI's verl environment: a failed import is a failure, not a skip
    import verl.trainer.distillation.losses as verl_losses
else:
    verl_losses = pytest.importorskip("verl.trainer.distillation.losses",
                                      reason="verl is not installed (CI runs this file in .ci/run's verl environment)")
import verl.trainer.distillation.fsdp.losses as verl_fsdp  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig  # noqa: E402

import wpkl  # noqa: E402
from wpkl.integrations import verl as wv  # noqa: E402

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
V, K = 13, 4


@pytest.fixture(autouse=True)
def restored():
    yield
    wv.undo()


def _nested(rows):
    return tu.nested_tensor_from_tensor_list(rows, ragged_idx=1)


def _batch(seed=0, dtype=torch.float32, prompts=(2, 3, 1), responses=(4, 2, 5)):
    g = torch.Generator().manual_seed(seed)
    lengths = [p + r for p, r in zip(prompts, responses, strict=True)]
    nnz = sum(lengths)
    logits = (torch.randn(1, nnz, V, generator=g) * 2).to(dtype)
    teacher = torch.randn(nnz, V, generator=g) * 2
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(nnz)])
    lq = torch.log_softmax(teacher, -1).gather(-1, ids)
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    rows = lambda x: [x[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]  # noqa: E731
    masks = [torch.rand(r, generator=g) > 0.2 for r in responses]
    masks[0][0] = True
    data = tu.get_tensordict(
        {"prompts": _nested([torch.randint(0, V, (p,), generator=g) for p in prompts]),
         "responses": _nested([torch.randint(0, V, (r,), generator=g) for r in responses]),
         "response_mask": _nested([m.long() for m in masks]),
         "teacher_logprobs": _nested(rows(lq)), "teacher_ids": _nested(rows(ids)),
         "old_log_probs": _nested([-torch.rand(r, generator=g) for r in responses])},
        non_tensor_dict={"dp_size": 1, "batch_num_tokens": int(sum(m.sum() for m in masks)),
                         "global_batch_size": len(prompts)})
    return logits, data, torch.tensor(offsets)


def _configs(agg="token-mean", clamp=-10.0, loss_max=10.0, mode="forward_kl_topk", policy_gradient=False):
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=agg)
    loss = DistillationLossConfig(loss_mode=mode, topk=K, log_prob_min_clamp=clamp, loss_max_clamp=loss_max,
                                  use_policy_gradient=policy_gradient, use_task_rewards=False)
    return actor, DistillationConfig(enabled=False, distillation_loss=loss)


def _run(logits, data, offsets, actor, distill, processor=None):
    """verl's logits processor (as its FSDP engine calls it) then its distillation_loss; the loss, the processor's
    outputs (padded rows) and the gradient of the logits."""
    x = logits.detach().clone().requires_grad_(True)
    processor = processor or verl_fsdp.compute_forward_kl_topk
    outputs = processor(x, data["teacher_logprobs"], data["teacher_ids"], distill, "thd")
    model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets) for k, v in outputs.items()}
    if distill.distillation_loss.use_policy_gradient:
        model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(
            torch.log_softmax(x.float(), -1)[0, :, 0], offsets)
    loss, metrics = verl_losses.distillation_loss(actor, distill, model_output, data)
    loss.backward()
    return loss.detach(), {k: v.squeeze(0).detach() for k, v in outputs.items()}, x.grad, metrics


def _close(a, b, what, dtype=torch.float32):
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(a.float(), b.float(), msg=lambda m: f"{what}: {m}", **tol)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clamp,loss_max", [(-10.0, 10.0), (-2.0, 0.4), (None, None)])
def test_verl_mode_matches_verl(agg, dtype, clamp, loss_max):
    """topk_mode="verl": the processor's outputs, verl's loss (its clamps, every aggregation) and the logits'
    gradient equal verl's own compute_forward_kl_topk's. (-2.0, 0.4) makes both clamps bind on some tokens.
    bfloat16: verl takes the log-softmax in bfloat16, wpkl in float32: within bfloat16's rounding."""
    logits, data, offsets = _batch(dtype=dtype)
    actor, distill = _configs(agg, clamp, loss_max)
    ref_loss, ref_out, ref_grad, _ = _run(logits, data, offsets, actor, distill)
    wv.use_wpkl(topk_mode="verl")
    assert verl_fsdp.compute_forward_kl_topk is wv._fsdp_topk
    loss, out, grad, _ = _run(logits, data, offsets, actor, distill)
    _close(loss, ref_loss, "loss", dtype)
    for key in ("distillation_losses", "student_mass", "teacher_mass", "overlap_token_advantage"):
        _close(out[key], ref_out[key], key, dtype)
    if dtype == torch.float32:
        assert torch.equal(out["overlap_count"], ref_out["overlap_count"])
    _close(grad, ref_grad, "gradient of the logits", dtype)
    assert grad.dtype == ref_grad.dtype and grad.shape == ref_grad.shape
    if clamp == -2.0:  # the floor binds: verl's and wpkl's gradients are zero on the same clamped atoms
        assert (ref_out["distillation_losses"] > 0.4).any()


def test_policy_gradient_form_and_undo():
    logits, data, offsets = _batch(seed=3)
    actor, distill = _configs(policy_gradient=True)
    ref = _run(logits, data, offsets, actor, distill)
    original = verl_fsdp.compute_forward_kl_topk
    wv.use_wpkl()
    got = _run(logits, data, offsets, actor, distill)
    _close(got[0], ref[0], "policy-gradient loss")
    _close(got[2], ref[2], "policy-gradient gradient")
    wv.undo()
    assert verl_fsdp.compute_forward_kl_topk is original and wv.options() is None
    assert not any(name.startswith("wpkl_") for name in verl_losses.DISTILLATION_LOSS_REGISTRY)


@pytest.mark.parametrize("mode,divergence", [("tail", "forward_kl"), ("tail", "reverse_kl"),
                                             ("renormalize", "forward_kl"), ("renormalize", "jsd")])
def test_wpkl_modes_are_wpkl_topk(mode, divergence):
    """wpkl's modes give wpkl's top-k loss on the same atoms; the tail bucket keeps forward KL >= 0."""
    logits, data, offsets = _batch(seed=5)
    _, distill = _configs()
    wv.use_wpkl(topk_mode=mode, divergence=divergence)
    x = logits.clone().requires_grad_(True)
    out = verl_fsdp.compute_forward_kl_topk(x, data["teacher_logprobs"], data["teacher_ids"], distill, "thd")
    ids, lq = data["teacher_ids"].values().unsqueeze(0), data["teacher_logprobs"].values().unsqueeze(0)
    ref = wpkl.weighted_kl_loss(x, None, teacher_topk_ids=ids, teacher_topk_logprobs=lq, topk_mode=mode,
                                divergence=divergence, reduction="none", backend="reference")
    _close(out["distillation_losses"], ref, "per-token loss")
    assert out["distillation_losses"].shape == x.shape[:2] and out["distillation_losses"].requires_grad
    if mode == "tail":
        assert (out["distillation_losses"] >= -1e-6).all()


def _response_rows(x, data):
    from verl.workers.utils.padding import no_padding_2_padding

    return no_padding_2_padding(x, data)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_registered_topk_mode(agg):
    """wpkl_forward_kl_topk: uniform weighting is exactly verl's forward_kl_topk; with a weighting the
    per-token losses are w_i L_i with wpkl's own weights of the response tokens (wpkl.weighted_kl_loss on the
    padded response rows, an independent code path)."""
    logits, data, offsets = _batch(seed=7)
    actor, distill = _configs(agg, loss_max=None)
    ref = _run(logits, data, offsets, actor, distill)
    wv.use_wpkl()
    _, distill_w = _configs(agg, loss_max=None, mode=wv.TOPK_NAME)
    got = _run(logits, data, offsets, actor, distill_w)
    _close(got[0], ref[0], "uniform wpkl_forward_kl_topk")
    weighting = wpkl.Weighting(accumulated=0.5, confidence=1.0, normalize=False)
    wv.use_wpkl(topk_mode="tail", weighting=weighting)
    loss, out, grad, metrics = _run(logits, data, offsets, actor, distill_w)
    assert "distillation/wpkl_weight_mean" in metrics
    # wpkl itself on the response rows: the same per-token losses, weighted by its engine
    x = logits.detach().clone().requires_grad_(True)
    full = _response_rows(x[0], data)  # [bsz, resp, V]
    ids, lq = (_response_rows(data[k], data) for k in ("teacher_ids", "teacher_logprobs"))
    mask = data["response_mask"].to_padded_tensor(0).bool()
    weighted = wpkl.weighted_kl_loss(full, None, teacher_topk_ids=ids, teacher_topk_logprobs=lq, mask=mask,
                                     topk_mode="tail", divergence="forward_kl", weighting=weighting,
                                     reduction="none", backend="torch").clamp_min(0.0)
    from verl.trainer.ppo.core_algos import agg_loss

    expected = agg_loss(weighted, mask, agg, dp_size=1, batch_num_tokens=data["batch_num_tokens"],
                        global_batch_size=data["global_batch_size"])
    _close(loss, expected.detach(), "weighted loss")


@pytest.mark.parametrize("name", wv.ESTIMATORS)
def test_registered_estimator_modes(name):
    """wpkl_<estimator>: uniform is verl's estimator loss exactly; IW-OPD weights (accumulated) multiply it,
    as the IW-OPD authors define them (1 + gamma (1 - A_i / S_b) over |log q(y) - log p(y)|)."""
    g = torch.Generator().manual_seed(11)
    _, data, offsets = _batch(seed=11)
    nnz = int(offsets[-1])
    student_lp = -torch.rand(nnz, generator=g) * 3
    data["teacher_logprobs"] = torch.nested.nested_tensor_from_jagged((-torch.rand(nnz, 1, generator=g) * 3), offsets)
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(student_lp, offsets)}
    actor, distill = _configs("token-mean", mode=name, policy_gradient=name == "k1")  # verl: k1 only as a reward
    ref, _ = verl_losses.compute_distillation_loss_reverse_kl_estimator(actor, distill, model_output, data)
    wv.use_wpkl(weighting=wpkl.Weighting(accumulated=0.5, normalize=False))
    fn = verl_losses.get_distillation_loss_fn(f"wpkl_{name}")
    got, metrics = fn(actor, distill, model_output, data)
    mask = data["response_mask"].to_padded_tensor(0).bool()
    lp = _response_rows(model_output["log_probs"], data)
    lq = _response_rows(data["teacher_logprobs"], data).squeeze(-1)
    d = torch.where(mask, (lq - lp).abs(), 0.0).double()
    prefix, total = d.cumsum(-1) - d, d.sum(-1, keepdim=True).clamp_min(1e-8)
    w = torch.where(mask, 1 + 0.5 * (1 - prefix / total), 0.0)
    _close(got, ref * w.to(ref.dtype), f"weighted {name}")
    wv.use_wpkl()
    uniform, _ = fn(actor, distill, model_output, data)
    assert torch.equal(uniform, ref)
    assert math.isfinite(float(metrics["distillation/wpkl_weight_mean"].aggregate()))


def test_power_mode_is_powered_opd():
    """wpkl_power: PowerOPD's -advantage p(y)^alpha - q(y)^alpha per token (alpha from use_wpkl, 5 by default),
    through verl's own policy-gradient form; the supervised form is refused (p^alpha is a reward, not a loss)."""
    g = torch.Generator().manual_seed(13)
    _, data, offsets = _batch(seed=13)
    nnz = int(offsets[-1])
    student_lp = -torch.rand(nnz, generator=g) * 2
    data["teacher_logprobs"] = torch.nested.nested_tensor_from_jagged(-torch.rand(nnz, 1, generator=g) * 2, offsets)
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(student_lp, offsets)}
    mask = data["response_mask"].to_padded_tensor(0).bool()
    lp = _response_rows(model_output["log_probs"], data).double()
    lq = _response_rows(data["teacher_logprobs"], data).squeeze(-1).double()
    wv.use_wpkl()  # registers the mode (verl's config checks the name)
    assert wv.options().sampled_power == 5.0  # the paper's default
    actor, distill = _configs("token-mean", mode=wv.POWER_NAME, policy_gradient=True)
    for alpha in (5.0, 2.0):
        wv.use_wpkl(sampled_power=alpha)
        got, _ = verl_losses.get_distillation_loss_fn(wv.POWER_NAME)(actor, distill, model_output, data)
        expected = (alpha * lp).exp() - (alpha * lq).exp()
        _close(torch.where(mask, got, 0.0), torch.where(mask, expected, 0.0), f"PowerOPD at alpha {alpha}")
    # verl's whole distillation loss in its policy-gradient form runs on it
    loss, _ = verl_losses.distillation_loss(actor, distill, model_output, data)
    assert torch.isfinite(loss)
    _, supervised = _configs("token-mean", mode=wv.POWER_NAME, policy_gradient=False)
    with pytest.raises(ValueError, match="use_policy_gradient=True"):
        verl_losses.get_distillation_loss_fn(wv.POWER_NAME)(actor, supervised, model_output, data)
    with pytest.raises(ValueError, match="sampled_power"):
        wv.use_wpkl(sampled_power=0.0)


def test_token_importance_reads_verls_entropy():
    """TIP's selection from the student's entropy in verl's model output (calculate_entropy=True), over the
    micro-batch's response tokens; without the entropy a clear error."""
    g = torch.Generator().manual_seed(17)
    _, data, offsets = _batch(seed=17)
    nnz = int(offsets[-1])
    data["teacher_logprobs"] = torch.nested.nested_tensor_from_jagged(-torch.rand(nnz, 1, generator=g) * 2, offsets)
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(-torch.rand(nnz, generator=g) * 2, offsets)}
    actor, distill = _configs("token-mean", mode="k3")
    ref, _ = verl_losses.compute_distillation_loss_reverse_kl_estimator(actor, distill, model_output, data)
    wv.use_wpkl(weighting=wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5), normalize=False))
    fn = verl_losses.get_distillation_loss_fn("wpkl_k3")
    with pytest.raises(ValueError, match="calculate_entropy=True"):
        fn(actor, distill, model_output, data)
    model_output["entropy"] = torch.nested.nested_tensor_from_jagged(torch.rand(nnz, generator=g) * 3, offsets)
    got, _ = fn(actor, distill, model_output, data)
    mask = data["response_mask"].to_padded_tensor(0).bool()
    lp = _response_rows(model_output["log_probs"], data)
    lq = _response_rows(data["teacher_logprobs"], data).squeeze(-1)
    entropy = _response_rows(model_output["entropy"], data)
    selected = wpkl.reference.token_importance_factor(entropy.double(), (lq - lp).abs().double(), mask, 0.5)
    assert 0 < int(selected.sum()) < int(mask.sum())
    _close(got, ref * selected.to(ref.dtype), "TIP-selected k3")


def test_ulysses_slicing_is_verls(monkeypatch):
    """With a Ulysses group, the teacher's data are sliced by verl's own helper, as its function does; the zero
    rows its padding adds (ids 0, log-probs 0) get loss 0 and no gradient, the other rows verl's values."""
    calls = []
    logits, data, offsets = _batch(seed=2)
    n = logits.shape[1]

    def slice_and_pad(x, dim):  # rank 1 of 2 after padding the stream with 3 zero rows
        calls.append(dim)
        padded = torch.cat([x, x.new_zeros(1, 3, *x.shape[2:])], 1)
        return padded[:, padded.shape[1] // 2:]

    monkeypatch.setattr(verl_fsdp, "get_ulysses_sequence_parallel_world_size", lambda: 2)
    monkeypatch.setattr(verl_fsdp, "slice_input_tensor", slice_and_pad)
    _, distill = _configs()
    half = torch.cat([logits, logits[:, :3]], 1)[:, (n + 3) // 2:].clone().requires_grad_(True)
    ref = verl_fsdp.compute_forward_kl_topk(half, data["teacher_logprobs"], data["teacher_ids"], distill, "thd")
    wv.use_wpkl()
    out = verl_fsdp.compute_forward_kl_topk(half, data["teacher_logprobs"], data["teacher_ids"], distill, "thd")
    assert calls == [1, 1, 1, 1] and out["distillation_losses"].shape == half.shape[:2]
    real = half.shape[1] - 3
    _close(out["distillation_losses"][0, :real], ref["distillation_losses"][0, :real], "real rows")
    assert (out["distillation_losses"][0, real:] == 0).all()
    out["distillation_losses"].sum().backward()
    assert (half.grad[0, real:] == 0).all()


# ----------------------------------------------------------------------------- Megatron's vocabulary shards

def _tp_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        logits, data, _ = _batch(seed=9, prompts=(2, 2), responses=(3, 4))
        logits = torch.cat([logits, logits[..., :1] - 1.0], -1)  # V + 1 = 14 columns: 7 per rank
        vocab = logits.shape[-1]
        _, distill = _configs(clamp=-2.0)
        x = logits.clone().requires_grad_(True)
        ref = verl_fsdp.compute_forward_kl_topk(x, data["teacher_logprobs"], data["teacher_ids"], distill, "thd")
        ref["distillation_losses"].sum().backward()
        part = vocab // world
        local = logits[..., rank * part:(rank + 1) * part].clone().requires_grad_(True)
        ids, lq = data["teacher_ids"].values().unsqueeze(0), data["teacher_logprobs"].values().unsqueeze(0)
        got = wv.topk_outputs(local, ids, lq, distill.distillation_loss, wv.VerlOptions(), process_group=dist.group.WORLD)
        got["distillation_losses"].sum().backward()
        for key in ("distillation_losses", "student_mass", "teacher_mass", "overlap_token_advantage"):
            _close(got[key], ref[key], key)
        assert torch.equal(got["overlap_count"], ref["overlap_count"])
        _close(local.grad, x.grad[..., rank * part:(rank + 1) * part], "gradient slice")
        _megatron_entry_point(local, data, distill, ref, dist.group.WORLD)
        open(os.path.join(out, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()
    leave_worker()


def _megatron_entry_point(local, data, distill, ref, group):
    """use_wpkl's Megatron processor itself: verl's Megatron module needs megatron-core (not installed here), so
    two stand-ins take its place, recording how they are called: megatron.core.parallel_state (the group) and
    verl's context-parallel cut (here, with one context rank, the values unsqueezed, as verl's cut returns them)."""
    import sys
    import types

    import torch.distributed as dist

    cuts = []
    state = types.ModuleType("megatron.core.parallel_state")
    state.get_tensor_model_parallel_group = lambda: group
    state.get_tensor_model_parallel_world_size = lambda: dist.get_world_size(group)
    megatron_losses = types.ModuleType(wv._MODULES["megatron"])
    megatron_losses.compute_forward_kl_topk = None
    megatron_losses.preprocess_thd_engine = lambda x, pre_process: cuts.append(("thd", pre_process)) or (
        x.values().unsqueeze(0), None, None)
    megatron_losses.preprocess_bshd_engine = lambda x, pre_process: cuts.append(("bshd", pre_process))
    stand_ins = {"megatron": types.ModuleType("megatron"), "megatron.core": types.ModuleType("megatron.core"),
                 "megatron.core.parallel_state": state, wv._MODULES["megatron"]: megatron_losses}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        wv.use_wpkl(topk_mode="verl")
        assert megatron_losses.compute_forward_kl_topk is wv._megatron_topk
        x = local.detach().clone().requires_grad_(True)
        got = megatron_losses.compute_forward_kl_topk(x, data["teacher_logprobs"], data["teacher_ids"], distill, "thd")
        assert cuts == [("thd", True), ("thd", True)]
        for key in ("distillation_losses", "overlap_token_advantage"):  # (its masses: verl's Megatron convention,
            _close(got[key], ref[key], f"megatron entry point: {key}")  # the clamped ones: the test below)
        wv.undo()
        assert megatron_losses.compute_forward_kl_topk is None
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_megatron_vocabulary_shards(tmp_path):
    """The top-k loss on vocabulary shards (Megatron's layout, a gloo group standing in for its tensor-parallel
    group) equals verl's loss on the whole vocabulary, diagnostics included, and each rank's gradient is its
    slice; use_wpkl's Megatron processor takes Megatron's group and verl's context-parallel cut."""
    import torch.multiprocessing as mp

    mp.start_processes(_tp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


def test_memory_bench_runs(capsys):
    """bench/verl_memory.py's three variants at a tiny size (docs/recipes.md's table comes from a larger run)."""
    from bench import verl_memory

    assert verl_memory.main(["--device", "cpu", "--tokens", "256", "--vocab", "512", "--dtype", "float32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 256 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["verl", "verl chunked", "wpkl"]
    assert wv.options() is None  # each variant undone


def _megatron_worker(rank, world, port, out):
    """verl's own Megatron function (megatron-core's parallel state on a gloo group) against use_wpkl's: the
    vocabulary-parallel logits of a THD batch cut by verl, every output on the real rows, and the gradient."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from megatron.core import parallel_state as mpu

        mpu.initialize_model_parallel(tensor_model_parallel_size=world)
        import verl.trainer.distillation.megatron.losses as verl_megatron

        _, data, offsets = _batch(seed=9, prompts=(2, 2), responses=(3, 4))
        lengths = offsets.diff().tolist()
        padded = [n + (-n) % world for n in lengths]  # verl's THD alignment at tp = world, cp = 1
        starts = torch.tensor([0, *padded]).cumsum(0).tolist()
        real = torch.cat([start + torch.arange(n) for start, n in zip(starts, lengths, strict=False)])
        full = torch.randn(1, sum(padded), 7 * world, generator=torch.Generator().manual_seed(1)) * 2
        for clamp in (-2.0, None):
            _, distill = _configs(clamp=clamp)
            results = {}
            for name in ("verl", "wpkl"):
                if name == "wpkl":
                    wv.use_wpkl(topk_mode="verl")
                x = full[..., rank * 7:(rank + 1) * 7].clone().requires_grad_(True)
                got = verl_megatron.compute_forward_kl_topk(x, data["teacher_logprobs"], data["teacher_ids"], distill,
                                                            "thd")
                got["distillation_losses"][0, real].sum().backward()
                results[name] = ({k: v[0, real].detach() for k, v in got.items()}, x.grad[0, real])
            wv.undo()
            (ref, ref_grad), (mine, grad) = results["verl"], results["wpkl"]
            assert set(mine) == set(ref)
            for key in ref:
                _close(mine[key], ref[key], f"megatron {key} (clamp {clamp})")
            _close(grad, ref_grad, f"megatron gradient (clamp {clamp})")
        open(os.path.join(out, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()
    leave_worker()


def test_verls_megatron_function(tmp_path):
    """Parity with verl's own Megatron top-k function (needs megatron-core: CI's verl environment has it)."""
    if not os.environ.get("WPKL_REQUIRE_MEGATRON"):
        pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    import torch.multiprocessing as mp

    mp.start_processes(_megatron_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
