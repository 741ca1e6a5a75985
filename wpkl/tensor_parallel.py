"""Vocabulary parallelism (Megatron's tensor-parallel lm_head): the loss from vocabulary shards, never gathering
[N, V].

Rank r of a group of R ranks holds the contiguous vocabulary slice ``[r * V_local, (r + 1) * V_local)`` of the
student's logits (or lm_head rows) and of the teacher's: equal shards, the whole vocabulary ``V = R * V_local``.
Token ids (``tokens``, ``teacher_topk_ids``) are global. Every rank gets the same loss, the same TokenStats and
the same weights; the gradient of the student logits (lm_head weight, bias) is the rank's slice of the
full-vocabulary gradient, and the hidden states' gradient (fused-linear form) is the full one, summed over the
group here.

How: the per-token math of wpkl/reference.py runs on each rank's slice with a ``VocabShard`` (below) combining
its per-row vocabulary sums and maxima over the group: all-reduces of [rows]-sized tensors (the log-normalizers
first: a max, then a sum; then the divergence's and the statistics' sums). Weighting and reduction then run on
the combined per-token terms, identically on every rank. The sums' gradient is the identity (Megatron's
``_ReduceFromModelParallelRegion``): every rank computes the same loss from the summed value, so d loss / d (a
rank's part) = d loss / d (the sum), and autograd gives each rank the gradient of its own slice with no
collective in backward (except where the torch pass recomputes a chunk in backward: half-precision logits, and
the fused-linear two-phase schedule, which run the forward's collectives again, on every rank alike).

Before any of these, one all-gather of a few integers per rank (``agree``) checks that the ranks agree on the
shapes and options, and that none rejected its inputs: a bad input raises on every rank, never leaving the
others waiting in a collective.
"""

from __future__ import annotations

import zlib

import torch

# The options the ranks must agree on (their number of collectives depends on them), in the order ``agree``
# reports them.
_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FIELDS = ("prepared", "values checked", "local vocabulary", "teacher's local vocabulary", "leading dimensions",
           "leading size 0", "leading size 1", "top-k K", "student dtype", "teacher dtype", "requires_grad",
           "backend", "options")


def _dist():
    import torch.distributed as dist

    return dist


class _AllReduceSum(torch.autograd.Function):
    """The sum over the group; backward: the identity (every rank computes the same loss from the sum)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        _dist().all_reduce(y, op=_dist().ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """The identity; backward: the gradient summed over the group (a value every rank holds, used by per-rank
    work: each rank's part of its gradient is added up)."""

    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shard = ctx.shard
        shard._count(grad)
        grad = grad.contiguous().clone()
        _dist().all_reduce(grad, op=_dist().ReduceOp.SUM, group=shard.group)
        return grad, None


class VocabShard:
    """This rank's slice of a vocabulary split evenly over ``group``: what wpkl/reference.py's per-row vocabulary
    sums and maxima need to become the whole vocabulary's. Counts its collectives (``calls``, ``bytes``: the
    bytes each rank contributes) for tests and docs."""

    def __init__(self, group, size: int):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.size = size  # V_local
        self.offset = self.rank * size
        self.vocab = self.world * size
        self.calls = 0
        self.bytes = 0

    def _count(self, x: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += x.numel() * x.element_size()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        return _AllReduceSum.apply(x, self.group)

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyToGroup.apply(x, self)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        y = x.detach().contiguous().clone()
        _dist().all_reduce(y, op=_dist().ReduceOp.MAX, group=self.group)
        return y

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """In place, no autograd: the fused-linear form's hidden-state gradient."""
        self._count(x)
        _dist().all_reduce(x, op=_dist().ReduceOp.SUM, group=self.group)
        return x

    def __repr__(self) -> str:
        return f"VocabShard(rank={self.rank}, world={self.world}, size={self.size})"


def check_group(process_group) -> None:
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed initialized (init_process_group)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")


def _device(group, device):
    """Where the metadata travels: the CPU for gloo, the inputs' device otherwise (NCCL needs CUDA tensors)."""
    backend = str(_dist().get_backend(group))
    if backend == "gloo" or device is None:
        return torch.device("cpu") if backend == "gloo" or not torch.cuda.is_available() else torch.device(
            "cuda", torch.cuda.current_device())
    return device


def _facts(problem, backend: str, options: list[int]) -> list[int]:
    """This rank's shapes and options, as integers, for ``agree``; checks the teacher's slice is the student's."""
    lin = problem.linear
    if lin is None:
        student, teacher = problem.student, problem.teacher
        vocab, t_vocab = student.shape[-1], None if teacher is None else teacher.shape[-1]
        names = ("student_logits", "teacher_logits")
        grad = student.requires_grad
    else:
        student, teacher = lin.student_hidden, lin.teacher_hidden
        vocab = lin.student_weight.shape[0]
        t_vocab = None if lin.teacher_weight is None else lin.teacher_weight.shape[0]
        names = ("student_weight", "teacher_weight")
        grad = any(x is not None and x.requires_grad for x in (lin.student_hidden, lin.student_weight,
                                                                lin.student_bias))
    if t_vocab is not None and t_vocab != vocab:
        raise ValueError(f"with process_group, {names[1]} must hold the same vocabulary slice as {names[0]} "
                         f"(Megatron's layout): local vocabulary {t_vocab} != {vocab}; shard a padded teacher "
                         "vocabulary like the student's")
    leading = list(problem.leading_shape)
    k = -1 if problem.topk_ids is None else problem.topk_ids.shape[-1]
    return [vocab, -1 if t_vocab is None else t_vocab, len(leading), *(leading + [0, 0])[:2], k,
            _DTYPES.index(student.dtype), 0 if teacher is None else _DTYPES.index(teacher.dtype), int(grad),
            ("torch", "reference").index(backend), zlib.crc32(repr(options).encode())]


def agree(process_group, prepare, check_values):
    """Validate on every rank, then agree: ``prepare()`` -> (problem, resolved backend, options: a list of ints
    that every rank must share); ``check_values(problem)`` the value checks (after the shard is set, for the
    global vocabulary). One all-gather of ``len(_FIELDS)`` int64 per rank (and one host sync) carries each rank's
    outcome and shapes; if any rank rejected its inputs or the ranks disagree, every rank raises.

    Returns (problem with ``problem.shard`` set, resolved backend)."""
    dist = _dist()
    check_group(process_group)
    error, values_error, problem, resolved, facts = None, None, None, None, [0] * (len(_FIELDS) - 2)
    try:
        problem, resolved, options = prepare()
        facts = _facts(problem, resolved, options)
        problem.shard = VocabShard(process_group, facts[0])
    except (ValueError, TypeError) as e:
        error = e
    if error is None:
        try:
            check_values(problem)
        except ValueError as e:
            values_error = e
    mine = torch.tensor([int(error is None), int(values_error is None), *facts], dtype=torch.int64,
                        device=_device(process_group, None if problem is None else problem.device))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, mine, group=process_group)
    table = torch.stack(gathered).cpu().tolist()  # the one host sync of a vocabulary-parallel call

    def raise_for(column: int, own):
        failed = [r for r, row in enumerate(table) if not row[column]]
        if not failed:
            return
        if own is not None:
            raise own
        raise ValueError(f"process_group: rank(s) {failed} rejected their inputs (their error says why): no rank "
                         "computes this loss")

    raise_for(0, error)
    sizes = [row[2] for row in table]
    if len(set(sizes)) > 1:
        raise ValueError(f"process_group: the vocabulary shards differ in size across the ranks (local V = {sizes}): "
                         f"wpkl takes Megatron's layout, equal contiguous shards, so the group's size "
                         f"({len(table)}) must divide the vocabulary (pad it to a multiple)")
    for column in range(3, len(_FIELDS)):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            what = _FIELDS[column]
            raise ValueError(f"process_group: the ranks disagree on the {what} of their inputs ({values}): every rank "
                             "passes the same tokens, mask and options, and its own vocabulary slice")
    raise_for(1, values_error)
    return problem, resolved
