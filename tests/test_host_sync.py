"""The Triton path makes no host synchronization and dispatches few device kernels, whatever the arguments.

A host sync (``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``, ...) stalls the training loop until the GPU
catches up and forbids CUDA graphs. These tests record every such call made from wpkl's own code during a
forward and backward on the Triton path (the interpreter here; the CUDA code path is the same Python), with the
value checks' CUDA branch (deferred flags) forced on, and count the torch ops wpkl dispatches.
"""

import itertools
import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import wpkl
import wpkl.inputs.checks
import wpkl.kernels

PACKAGE_DIRS = (os.path.dirname(wpkl.__file__), *wpkl.kernels.__path__)
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def _from_wpkl(depth: int) -> bool:
    """Whether the torch call being made comes from wpkl's code (not the Triton interpreter, not torch itself)."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/triton/" in name or name.endswith("test_host_sync.py"):
            return False
        if name.startswith(PACKAGE_DIRS):
            return True
        frame = frame.f_back
    return False


class _FakeEvent:
    def record(self):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


def install_spies(monkeypatch, calls: list) -> None:
    """Record in ``calls`` every host-syncing tensor method called from wpkl, and every tensor made from host
    data (``torch.tensor``/``as_tensor`` of numbers: on CUDA a host-to-device copy, which waits for the GPU), with
    the CUDA branch of the value checks forced on."""
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            # (reading an earlier call's flags that have arrived in pinned host memory, _raise_from, waits for
            # nothing: a later wpkl call does it; nor does reading a mixing tensor the caller gave on the CPU,
            # _mixing_kind, which never reads one on a device: tests/test_mixture_pass.py)
            if _from_wpkl(2) and sys._getframe(1).f_code.co_name not in ("_raise_from", "_mixing_kind"):
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    original_nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: (calls.append("torch.nonzero") if _from_wpkl(2) else None)
                        or original_nonzero(*a, **k))
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def made(data, *args, _original=original, _name=name, **kwargs):
            # (the position tables are copied once per device and cached: _device_table)
            if not isinstance(data, torch.Tensor) and _from_wpkl(2) and \
                    sys._getframe(1).f_code.co_name != "_device_table":
                calls.append(f"torch.{_name}")
            return _original(data, *args, **kwargs)

        monkeypatch.setattr(torch, name, made)
    monkeypatch.setattr(wpkl.inputs.checks, "_deferred", lambda flags: True)
    monkeypatch.setattr(wpkl.inputs.checks, "_pinned", lambda shape, dtype: torch.empty(shape, dtype=dtype))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)


@pytest.fixture
def syncs(monkeypatch):
    """Every host-syncing tensor method called from wpkl, with the CUDA branch of the value checks forced on."""
    calls = []
    install_spies(monkeypatch, calls)
    wpkl.inputs.checks._pending.clear()
    yield calls
    wpkl.inputs.checks._pending.clear()


def _inputs(packed=False, B=2, T=5, V=40):
    student = torch.randn(B, T, V, requires_grad=True)
    teacher = torch.randn(B, T, V + 3)
    mask = torch.rand(B, T) < 0.8
    if packed:
        return student.reshape(B * T, V).detach().requires_grad_(True), teacher.reshape(B * T, V + 3), mask.reshape(-1)
    return student, teacher, mask


OPTIONS = {
    "weighting": [None, wpkl.Weighting(position=wpkl.PositionTable([1.0, 0.5, 0.25]), confidence=1.0,
                                       disagreement=0.5, accumulated=0.5),
                  wpkl.Weighting(position=wpkl.PositionWindow(0.0, 0.5), normalize=False)],
    "reduction": ["mean", "sum", "seq_mean", "none"],
    "extras": ["none", "all"],
}


@pytest.mark.parametrize("weighting,reduction,extras", list(itertools.product(*OPTIONS.values())))
def test_no_host_sync_on_the_triton_path(syncs, weighting, reduction, extras):
    student, teacher, mask = _inputs()
    kwargs = dict(mask=mask, weighting=weighting, reduction=reduction, backend="triton", return_stats=True)
    if extras == "all":
        kwargs.update(token_weights=torch.rand(2, 5), positions=torch.arange(5).repeat(2, 1),
                      tokens=torch.randint(0, 40, (2, 5)), divergence="sampled")
        if reduction == "mean":
            kwargs["num_items_in_batch"] = torch.tensor(9)
    elif reduction == "mean":  # a number: a fill on the device, never a host-to-device copy
        kwargs["num_items_in_batch"] = 9.0
    loss, stats = wpkl.weighted_kl_loss(student, teacher, **kwargs)
    (loss * torch.ones_like(loss)).sum().backward()
    assert syncs == [], Counter(syncs)


@pytest.mark.parametrize("divergence", ["sampled", "reverse_kl"])
def test_no_host_sync_with_packed_input_and_logprobs(syncs, divergence):
    student, teacher, mask = _inputs(packed=True)
    positions = torch.cat([torch.arange(4), torch.arange(6)])
    kwargs = dict(teacher_logprobs=-torch.rand(10), rollout_logprobs=-torch.rand(10)) if divergence == "sampled" else {}
    loss = wpkl.weighted_kl_loss(student, None if kwargs else teacher, mask=mask, positions=positions,
                                 tokens=torch.randint(0, 40, (10,)), divergence=divergence, reduction="seq_mean",
                                 weighting=wpkl.Weighting(position=wpkl.ExpDecay(2.0)), backend="triton", **kwargs)
    loss.backward()
    assert syncs == [], Counter(syncs)


def test_bad_values_surface_later_on_the_gpu_path(syncs):
    """On CUDA the value checks do not stall: a bad input is raised by the next wpkl call (or check_errors)."""
    student, teacher, mask = _inputs()
    tokens = torch.randint(0, 40, (2, 5))
    tokens[0, 0] = 40  # out of range
    mask[0, 0] = True
    loss = wpkl.weighted_kl_loss(student, teacher, mask=mask, tokens=tokens, divergence="sampled", backend="triton")
    assert syncs == []
    # The kernel reads nothing for the out-of-range token (token 40 would be row 1's first logit): that row's loss,
    # and so the mean, is NaN, never a number borrowed from another row.
    assert torch.isnan(loss)
    with pytest.raises(wpkl.DeferredCheckError, match=r"tokens must lie in \[0, V\)"):
        wpkl.weighted_kl_loss(student, teacher, mask=mask, backend="triton")
    # And with check_errors() at a point of the caller's choosing:
    wpkl.weighted_kl_loss(student, teacher, mask=mask, token_weights=-torch.ones(2, 5), backend="triton")
    with pytest.raises(wpkl.DeferredCheckError, match="token_weights must be finite and >= 0"):
        wpkl.check_errors()
    wpkl.check_errors()  # nothing pending any more


def test_no_deferred_failure_is_lost_or_raised_while_held(syncs):
    """Two failures pending: check_errors raises the first, then the second (none dropped); while held
    (``holding_earlier``: a sync-free sequence-parallel call) a call raises neither, and they stay pending."""
    from wpkl.inputs.checks import holding_earlier

    student, teacher, mask = _inputs()
    tokens = torch.randint(0, 40, (2, 5))
    tokens[0, 0] = 40
    mask[0, 0] = True
    wpkl.weighted_kl_loss(student, teacher, mask=mask, token_weights=-torch.ones(2, 5), backend="triton")
    with holding_earlier():  # the earlier failure is not raised here
        wpkl.weighted_kl_loss(student, teacher, mask=mask, tokens=tokens, divergence="sampled", backend="triton")
        wpkl.weighted_kl_loss(student, teacher, mask=mask, backend="triton")
    with pytest.raises(wpkl.DeferredCheckError, match="token_weights must be finite and >= 0"):
        wpkl.check_errors()
    with pytest.raises(wpkl.DeferredCheckError, match=r"tokens must lie in \[0, V\)"):
        wpkl.check_errors()
    wpkl.check_errors()
    assert syncs == []


@pytest.fixture
def unpoisoned(monkeypatch):
    """The real allocators (conftest fills output buffers with NaN, a test-only kernel per buffer)."""
    import wpkl.backends.common

    monkeypatch.setattr(wpkl.backends.common, "new_buffer", torch.empty)
    monkeypatch.setattr(wpkl.backends.common, "new_buffer_like", torch.empty_like)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _from_wpkl(3):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# Ops that launch no device kernel: views, metadata, allocations.
NO_KERNEL = ("view", "reshape", "select", "slice", "detach", "alias", "as_strided", "expand", "unsqueeze", "squeeze",
             "t.default", "permute", "empty", "lift_fresh", "_unsafe_view")


@pytest.mark.parametrize("weighting,reduction,extras", list(itertools.product(*OPTIONS.values())))
def test_few_device_kernels(weighting, reduction, extras, unpoisoned):
    """At most 8 device kernels besides the Triton kernels (vocabulary pass forward and backward, weights), for any
    weighting and argument."""
    student, teacher, mask = _inputs()
    kwargs = dict(mask=mask, weighting=weighting, reduction=reduction, backend="triton", return_stats=True)
    if extras == "all":
        kwargs.update(token_weights=torch.rand(2, 5), positions=torch.arange(5).repeat(2, 1),
                      tokens=torch.randint(0, 40, (2, 5)), divergence="sampled")
    with _Ops() as seen:
        loss, _ = wpkl.weighted_kl_loss(student, teacher, **kwargs)
        (loss * 2).sum().backward() if loss.dim() else loss.backward()
    kernels = [op for op in seen.ops if not any(word in op for word in NO_KERNEL)]
    assert len(kernels) <= 8, Counter(kernels)


@pytest.mark.parametrize("weighting,reduction", [(None, "mean"), (OPTIONS["weighting"][1], "seq_mean"),
                                                 (OPTIONS["weighting"][2], "none")])
def test_no_host_sync_with_a_top_k_teacher(syncs, weighting, reduction):
    """A top-k teacher on the Triton path: the kernels, the atom math and the torch weights, with the value checks
    (ids in range, no duplicates, log-probs) deferred as on CUDA."""
    student, _, mask = _inputs()
    ids = torch.stack([torch.randperm(40)[:4] for _ in range(10)]).view(2, 5, 4)
    ids[0, 1, 3] = -1
    logprobs = -torch.rand(2, 5, 4) * 3
    loss = wpkl.weighted_kl_loss(student, None, mask=mask, weighting=weighting, reduction=reduction,
                                 teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, divergence="forward_kl",
                                 backend="triton")
    loss.sum().backward()
    assert syncs == [], Counter(syncs)


@pytest.mark.parametrize("mixing", ["numbers", "soft tensor", "with a logits teacher"])
def test_no_host_sync_with_several_top_k_teachers(syncs, mixing):
    """Three top-k teachers sharing one pass (wpkl/backends/triton_topk.py: TritonTopKMixturePass), their lists
    overlapping: the merge of their atoms stays on the device; so does the pass they share with a logits teacher
    (wpkl/backends/triton_logits_topk.py)."""
    student, teacher, mask = _inputs()
    teachers = []
    for k in range(3):
        ids = torch.stack([torch.randperm(6)[:4] for _ in range(10)]).view(2, 5, 4)  # (ids < 6: overlaps)
        ids[k % 2, 1, 3] = -1
        teachers.append(dict(teacher_topk_ids=ids, teacher_topk_logprobs=-torch.rand(2, 5, 4) * 3))
    weights = [0.2, 0.3, 0.5] if mixing == "numbers" else torch.rand(3, 2, 5)
    if mixing == "with a logits teacher":
        teachers[0] = teacher
    loss = wpkl.multi_teacher_loss(student, teachers=teachers, mixing=weights, mask=mask,
                                   weighting=wpkl.Weighting(accumulated=0.5), backend="triton")
    loss.sum().backward()
    assert syncs == [], Counter(syncs)


@pytest.mark.parametrize("mixing", ["numbers", "soft tensor"])
def test_no_host_sync_with_several_sampled_token_teachers(syncs, mixing):
    """Two logits teachers and a log q(y) answer of the sampled-token loss sharing one pass
    (wpkl/backends/triton_sampled.py: TritonSampledMixturePass), with the rollout's log p(y) and PowerOPD's power:
    the student pass, the teachers' passes and the gathers at the sampled tokens stay on the device."""
    student, teacher, mask = _inputs()
    tokens = torch.randint(0, 40, (2, 5))
    teachers = [teacher, torch.randn(2, 5, 43), dict(teacher_logits=None, teacher_logprobs=-torch.rand(2, 5) * 3)]
    weights = [0.2, 0.3, 0.5] if mixing == "numbers" else torch.rand(3, 2, 5)
    loss = wpkl.multi_teacher_loss(student, teachers=teachers, mixing=weights, mask=mask, tokens=tokens,
                                   divergence="sampled", sampled_power=5.0, rollout_logprobs=-torch.rand(2, 5),
                                   weighting=wpkl.Weighting(accumulated=0.5), backend="triton")
    loss.sum().backward()
    assert syncs == [], Counter(syncs)


@pytest.mark.parametrize("variant", ["power_opd", "tip", "eopd", "mopd iw-opd routed", "mopd position floats",
                                     "mopd none seq_mean routed"])
def test_no_host_sync_in_the_opd_variants(syncs, variant):
    """The OPD variants (tests/test_variants.py, tests/test_multi_teacher.py) keep the Triton path sync-free:
    TIP's selection and EOPD's gate stay on the device, and MOPD's mixing, routing masks and reduction
    coefficients too."""
    student, teacher, mask = _inputs()
    tokens = torch.randint(0, 40, (2, 5))
    kwargs = dict(mask=mask, tokens=tokens, backend="triton")
    if variant == "power_opd":
        loss = wpkl.weighted_kl_loss(student, teacher, divergence="sampled", sampled_power=5.0, **kwargs)
    elif variant == "tip":
        loss = wpkl.weighted_kl_loss(student, teacher, weighting=wpkl.Weighting(token_importance=wpkl.TokenImportance()),
                                     **kwargs)
    elif variant == "eopd":
        loss = wpkl.entropy_gated_loss(student, teacher, divergence="sampled", threshold=2.0, **kwargs)
    else:
        second = torch.randn(2, 5, 43)
        routing = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        options = {"mopd iw-opd routed": dict(weighting=wpkl.Weighting(accumulated=0.5), mixing=routing,
                                              return_stats=True),
                   "mopd position floats": dict(weighting=wpkl.Weighting(position=wpkl.ExpDecay(2.0)),
                                                mixing=[0.3, 0.7]),
                   "mopd none seq_mean routed": dict(mixing=routing, reduction="seq_mean")}[variant]
        out = wpkl.multi_teacher_loss(student, teachers=[teacher, second], **kwargs, **options)
        loss = out[0] if isinstance(out, tuple) else out
    loss.sum().backward()
    assert syncs == [], Counter(syncs)
