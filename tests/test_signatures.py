"""The modules cannot drift from the functions: every parameter of ``weighted_kl_loss`` / ``fused_linear_kl_loss``
is accepted by ``WeightedKLLoss`` / ``FusedLinearWeightedKLLoss`` (an option in the constructor, ``return_stats``
and the data in ``forward``) and gives the same result. Derived from the signatures and ``LossSpec``: a new
option without a module argument, or without a test value here, fails."""

from __future__ import annotations

import inspect

import pytest
import torch

import wpkl
from wpkl.spec import LossSpec

FORMS = {
    False: (wpkl.weighted_kl_loss, wpkl.WeightedKLLoss),
    True: (wpkl.fused_linear_kl_loss, wpkl.FusedLinearWeightedKLLoss),
}
B, T, V, H, K = 2, 5, 13, 8, 3

# A value other than the default for every option (None: checked for acceptance only, e.g. a process group).
OPTION_VALUES = {
    "divergence": "jsd", "beta": 0.3, "temperature": 1.7, "weighting": wpkl.Weighting(accumulated=0.5),
    "reduction": "sum", "backend": "reference", "return_stats": True, "inplace_backward": True,
    "topk_mode": "raw", "topk_logprob_floor": -4.0, "topk_loss_max": 3.0, "process_group": None, "sequence_group": None,
    "student_logit_scale": 0.5, "teacher_logit_scale": 2.0, "student_softcap": 3.0, "teacher_softcap": 4.0,
    "chunk_size": 3, "sampled_power": 5.0,
}
TOPK_OPTIONS = ("topk_mode", "topk_logprob_floor", "topk_loss_max")


def _params(fn) -> list[str]:
    return [name for name in inspect.signature(fn).parameters if name != "self"]


@pytest.mark.parametrize("linear", [False, True])
def test_every_parameter_has_a_home_in_the_module(linear):
    function, module = FORMS[linear]
    options = set(LossSpec.option_names(linear))
    ctor, forward = set(_params(module.__init__)), set(_params(module.forward))
    params = _params(function)
    assert options <= set(params), "an option of the spec the function does not take"
    assert set(OPTION_VALUES) >= options, "give the new option a test value in OPTION_VALUES"
    for name in params:
        if name in options and name != "return_stats":
            assert name in ctor, f"{module.__name__}() does not take {name}"
            assert getattr(module(), name) == LossSpec.from_options(linear=linear).options()[name]
        else:
            assert name in forward, f"{module.__name__}.forward does not take {name}"
    assert ctor <= options, "a constructor argument that is not an option"
    assert forward <= set(params), "a forward argument the function does not take"


def _inputs(linear: bool, teacher: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    data = dict(mask=mask, token_weights=torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5,
                tokens=torch.randint(0, V, (B, T), generator=g))
    if linear:
        data.update(student_hidden=rand(B, T, H), student_weight=rand(V, H), student_bias=rand(V),
                    teacher_hidden=rand(B, T, H), teacher_weight=rand(V + 2, H), teacher_bias=rand(V + 2))
    else:
        data.update(student_logits=rand(B, T, V), teacher_logits=rand(B, T, V + 2))
    if teacher == "topk":
        for name in ("teacher_logits", "teacher_hidden", "teacher_weight", "teacher_bias"):
            if name in data:
                data[name] = None
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
        data.update(teacher_topk_ids=ids, teacher_topk_logprobs=-torch.rand(B, T, K, generator=g,
                                                                              dtype=torch.float64) * 3 - 0.1)
    if teacher == "sampled":
        for name in ("teacher_logits", "teacher_hidden", "teacher_weight", "teacher_bias"):
            if name in data:
                data[name] = None
        data.update(teacher_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64) - 0.1,
                    rollout_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64) - 0.1,
                    num_items_in_batch=7.0)
    return data


def _call(fn, data, **kwargs):
    data = {k: (v.clone().requires_grad_(True) if k in ("student_logits", "student_hidden") else v)
            for k, v in data.items()}
    out = fn(**data, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    leaf = data.get("student_logits", data.get("student_hidden"))
    loss.sum().backward()
    return out, leaf.grad


def _cases(linear: bool):
    for name in LossSpec.option_names(linear):
        value = OPTION_VALUES[name]
        if value is None:
            continue
        teacher = "topk" if name in TOPK_OPTIONS else "logits"
        options = {name: value}
        if name in ("topk_logprob_floor", "topk_loss_max"):
            options["topk_mode"] = "raw"
        if name == "inplace_backward":
            options["backend"] = "auto"  # ignored off the Triton path: accepted, same result
        if name == "weighting":
            options["reduction"] = "mean"
        if name == "sampled_power":
            teacher, options["divergence"] = "sampled", "sampled"
        yield pytest.param(linear, teacher, options, id=f"{'linear' if linear else 'logits'}-{name}")
    yield pytest.param(linear, "sampled", dict(divergence="sampled", reduction="mean"),
                       id=f"{'linear' if linear else 'logits'}-sampled-data")


@pytest.mark.parametrize("linear,teacher,options", [*_cases(False), *_cases(True)])
def test_module_gives_the_functions_result(linear, teacher, options):
    function, module_class = FORMS[linear]
    data = _inputs(linear, teacher)
    return_stats = options.pop("return_stats", False)
    expected, expected_grad = _call(function, data, return_stats=return_stats, **options)
    module = module_class(**options)
    got, got_grad = _call(module, data, return_stats=return_stats)
    if return_stats:
        for a, b in zip(got[1].as_dict().values(), expected[1].as_dict().values(), strict=True):
            assert torch.equal(a, b)
        got, expected = got[0], expected[0]
    assert torch.equal(got, expected) and torch.equal(got_grad, expected_grad)
    for name, value in options.items():
        assert getattr(module, name) == value and module.spec.options()[name] == value


def test_module_option_setter_validates_and_replaces_the_spec():
    module = wpkl.WeightedKLLoss()
    spec = module.spec
    module.temperature = 2.0
    assert module.spec is not spec and module.spec.temperature == 2.0 and module.temperature == 2.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        module.temperature = 0.0
    assert module.temperature == 2.0, "a rejected value must leave the spec as it was"
    with pytest.raises(TypeError, match="unknown option"):
        LossSpec.from_options(chunk_size=4)  # a fused-linear option on the materialized form
