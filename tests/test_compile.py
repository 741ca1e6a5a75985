"""torch.compile: the Triton path is a torch custom op (wpkl/backends/ops.py), so a compiled step containing
weighted_kl_loss traces as one graph (fullgraph=True) with the kernels inside; the torch path compiles with graph
breaks allowed. On this CPU the Triton kernels run in the interpreter; the traced Python is the GPU path's."""

import pytest
import torch

import wpkl
from wpkl.backends import ops
from wpkl.backends.weights_kernel import encode_weighting

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")


@pytest.fixture(autouse=True)
def fresh_compiles():
    """No compiled code from an earlier run of the suite (Inductor's on-disk cache keys on the traced graph, not on
    wpkl's fake implementations)."""
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield


CASES = [
    dict(weighting=None, reduction="mean"),
    dict(weighting=wpkl.Weighting(position=wpkl.PositionTable([1.0, 0.5]), accumulated=0.5), reduction="seq_mean"),
    dict(weighting=wpkl.Weighting(confidence=1.0, disagreement=0.5, normalize=False), reduction="none"),
]


def _inputs():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 40, generator=g)
    teacher = torch.randn(2, 5, 43, generator=g)
    mask = torch.rand(2, 5, generator=g) < 0.8
    return student, teacher, mask


def _step(backend, case):
    def step(student, teacher, mask, tokens):
        loss, stats = wpkl.weighted_kl_loss(student, teacher, mask=mask, tokens=tokens, backend=backend,
                                            return_stats=True, **case)
        return (loss * 1.5).sum(), stats.weight
    return step


@pytest.mark.parametrize("case", CASES)
def test_triton_path_compiles_without_graph_breaks(case):
    torch._dynamo.reset()
    student, teacher, mask = _inputs()
    tokens = torch.randint(0, 40, (2, 5))
    step = _step("triton", case)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):  # fullgraph: a graph break is an error
        leaf = student.clone().requires_grad_(True)
        loss, weight = fn(leaf, teacher, mask, tokens)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), weight, grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


def test_torch_path_compiles_with_graph_breaks():
    torch._dynamo.reset()
    student, teacher, mask = _inputs()
    step = _step("torch", dict(weighting=wpkl.Weighting(accumulated=0.5)))
    leaf = student.clone().requires_grad_(True)
    compiled = torch.compile(step)(leaf, teacher, mask, None)[0]
    (grad,) = torch.autograd.grad(compiled, leaf)
    leaf2 = student.clone().requires_grad_(True)
    eager = step(leaf2, teacher, mask, None)[0]
    eager.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(grad, leaf2.grad)


def test_custom_op_passes_opcheck():
    """The op's schema, fake (meta) implementation and autograd registration are consistent (torch.library.opcheck)."""
    student, teacher, mask = _inputs()
    student.requires_grad_(True)
    args = (student, teacher, mask, None, None, None, torch.rand(2, 5), None, torch.tensor(7.0), None, "jsd", 0.3,
            0.9, None, encode_weighting(wpkl.Weighting(position=wpkl.ExpDecay(3.0), disagreement=1.0, w_max=2.5)), "mean", 0,
            float("nan"), False)
    torch.library.opcheck(ops.weighted_loss, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    tokens = torch.randint(0, student.shape[-1], mask.shape)  # PowerOPD's sampled_power through the schema
    powered = (student, teacher, mask, tokens, None, None, None, None, None, None, "sampled", 0.5, 1.0, 5.0,
               encode_weighting(wpkl.Weighting(position=wpkl.PositionSigmoid())), "none", 0, float("nan"), False)
    torch.library.opcheck(ops.weighted_loss, powered,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_inplace_backward_under_compile_allocates():
    """inplace_backward writes the gradient into the logits' storage in eager mode only; compiled, it allocates."""
    torch._dynamo.reset()
    student, teacher, mask = _inputs()

    def step(leaf):
        return wpkl.weighted_kl_loss(leaf * 1.0, teacher, mask=mask, backend="triton", inplace_backward=True)

    leaf = student.clone().requires_grad_(True)
    torch.compile(step, fullgraph=True)(leaf).backward()
    expected = student.clone().requires_grad_(True)
    wpkl.weighted_kl_loss(expected, teacher, mask=mask, backend="triton").backward()
    torch.testing.assert_close(leaf.grad, expected.grad)
