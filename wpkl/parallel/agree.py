"""The ranks of a process group agree before any other collective: every rank validates its inputs, then one
all-gather of a few int64 per rank (and the call's one host sync) carries each rank's outcome and the facts that
decide the number and order of the collectives. If any rank rejected its inputs, or the ranks disagree, every
rank raises: a bad input never leaves the other ranks waiting in a collective.

The facts are derived, not listed by hand: the options are ``LossSpec.agreement_key()`` (every option but the
groups), the optional inputs given are ``TokenBatch.given()``, and the route is the one the route table chose.
"""

from __future__ import annotations

import zlib

import torch

from ..inputs.data import Problem, StudentLinear, TeacherLinear, TeacherLogits
from .vocab import VocabShard

_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)
# What every rank's row of the table holds after its two outcome flags, by name (the error messages use them).
FACTS = ("local vocabulary", "teacher's local vocabulary", "leading dimensions", "leading size 0", "leading size 1",
         "top-k K", "student dtype",
         "teacher dtype", "requires_grad", "route", "options", "teachers", "mask and tokens")


def _dist():
    import torch.distributed as dist

    return dist


def _crc(value) -> int:
    return zlib.crc32(repr(value).encode())


def _device(group, device):
    """Where the metadata travels, decided by the group's backend alone (so that a rank whose inputs failed, with
    no device, picks what the others pick): CUDA when the backend has NCCL (the inputs' CUDA device, or the
    current one), else the CPU (gloo; a "cpu:gloo,cuda:nccl" group on a machine without CUDA)."""
    backend = str(_dist().get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        if device is not None and device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _facts(problem: Problem, route) -> dict[str, int]:
    """This rank's facts (``FACTS``), as integers; checks that the teacher's slice is the student's."""
    student, teacher = problem.student, problem.teacher
    if isinstance(student, StudentLinear):
        tensor, names, vocab = student.hidden, ("student_weight", "teacher_weight"), student.weight.shape[0]
        t_tensor = teacher.hidden if isinstance(teacher, TeacherLinear) else None
        t_vocab = teacher.weight.shape[0] if isinstance(teacher, TeacherLinear) else None
        grad = student.trainable
    else:
        tensor, names, vocab = student.logits, ("student_logits", "teacher_logits"), student.logits.shape[-1]
        t_tensor = teacher.logits if isinstance(teacher, TeacherLogits) else None
        t_vocab = None if t_tensor is None else t_tensor.shape[-1]
        grad = student.logits.requires_grad
    if t_vocab is not None and t_vocab != vocab:
        raise ValueError(f"with process_group, {names[1]} must hold the same vocabulary slice as {names[0]} "
                         f"(Megatron's layout): local vocabulary {t_vocab} != {vocab}; shard a padded teacher "
                         "vocabulary like the student's")
    topk = problem.teacher_topk
    options = (problem.spec.agreement_key(), problem.batch.given(), type(teacher).__name__,
               torch.is_autocast_enabled(problem.device.type))
    return {"local vocabulary": vocab, "teacher's local vocabulary": -1 if t_vocab is None else t_vocab,
            "leading dimensions": len(problem.batch.leading_shape),
            **{f"leading size {i}": size for i, size in enumerate((*problem.batch.leading_shape, 0, 0)[:2])},
            "top-k K": -1 if topk is None else topk.ids.shape[-1],
            "student dtype": _DTYPES.index(tensor.dtype),
            "teacher dtype": 0 if t_tensor is None else _DTYPES.index(t_tensor.dtype),
            # whether the torch pass runs the copy's backward in forward
            "requires_grad": int(grad and torch.is_grad_enabled()),
            "route": _crc(route.key), "options": _crc(options), "teachers": 0, "mask and tokens": 0}


def _checksum(problem: Problem) -> torch.Tensor:
    """An int64 digest of the mask, the sampled tokens, the top-k ids, the positions, sequence ids and token
    weights, which decide every rank's per-token collectives or weights and must be the same on every rank (the ranks' masks differing would give each a different loss)."""
    batch = problem.batch
    valid = batch.valid.reshape(-1).to(torch.int64)
    index = torch.arange(1, valid.numel() + 1, device=valid.device, dtype=torch.int64)
    digest = (valid * index).sum()
    if batch.tokens is not None:
        tokens = torch.where(valid.bool(), batch.tokens.reshape(-1).to(torch.int64), 0)
        digest = digest + (tokens * (index * 40503 + 7)).sum()
    for k, x in enumerate((batch.positions, batch.sequence_ids, batch.token_weights)):
        if x is not None:  # a sequence group's placement and the weights: the same on every vocabulary shard
            bits = x.reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64) if x.is_floating_point() else \
                x.reshape(-1).to(torch.int64)
            digest = digest + (bits * (index * (104729 + 2 * k) + 11)).sum()
    if problem.teacher_topk is not None:
        ids = problem.teacher_topk.ids.reshape(valid.numel(), problem.teacher_topk.ids.shape[-1]).to(torch.int64)
        digest = digest + (ids * valid.unsqueeze(-1) * (index.unsqueeze(-1) * 65599 + 3)).sum()
    return digest


def _teachers_fact(teachers) -> tuple[int, torch.Tensor | int]:
    """Several teachers (``teachers()`` -> their problems, routes and MixturePlan): each teacher's facts and the
    plan, which decide the collectives of the call's passes, as one integer; and the digest of their masks and
    top-k ids (device ops)."""
    problems, routes, plan = teachers()
    facts = [tuple(_facts(problem, own).values()) for problem, own in zip(problems, routes, strict=True)]
    digest = sum(_checksum(problem) * (k + 2) for k, problem in enumerate(problems))
    return _crc((facts, None if plan is None else plan.groups)), digest


def agree(process_group, prepare, check_values, teachers=None):
    """Validate on every rank, then agree. ``prepare()`` -> (problem, route); ``check_values(problem)`` the value
    checks (after the shard is set, for the global vocabulary); ``teachers()`` (several teachers, after
    ``prepare``): their problems, routes and plan, every one of which the ranks must share too. Returns (problem
    with its ``shard``, route)."""
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed initialized (init_process_group)")
    error, values_error, problem, route, facts, digest = None, None, None, None, dict.fromkeys(FACTS, 0), 0
    try:
        problem, route = prepare()
        facts = _facts(problem, route)
        if teachers is not None:
            facts["teachers"], digest = _teachers_fact(teachers)
        problem = problem.replace(shard=VocabShard(process_group, facts["local vocabulary"]))
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        error = e
    if error is None:
        try:
            check_values(problem)
        except Exception as e:  # noqa: BLE001 - as above
            values_error = e
    mine = torch.tensor([int(error is None), int(values_error is None), *facts.values()], dtype=torch.int64,
                        device=_device(process_group, None if problem is None else problem.device))
    if error is None:
        mine[-1] = (_checksum(problem) + digest).to(mine.device)  # device ops: read with the table, no extra sync
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, mine, group=process_group)
    table = torch.stack(gathered).cpu().tolist()  # the one host sync of a vocabulary-parallel call
    column = {name: 2 + i for i, name in enumerate(FACTS)}

    def raise_for(col: int, own):
        failed = [r for r, row in enumerate(table) if not row[col]]
        if not failed:
            return
        if own is not None:
            raise own
        raise ValueError(f"process_group: rank(s) {failed} rejected their inputs (their error says why): no rank "
                         "computes this loss")

    def same(name: str):
        values = [row[column[name]] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"process_group: the ranks disagree on the {name} of their inputs ({values}): every rank "
                             "passes the same tokens, mask and options, and its own vocabulary slice")

    raise_for(0, error)
    sizes = [row[column["local vocabulary"]] for row in table]
    if len(set(sizes)) > 1:
        raise ValueError(f"process_group: the vocabulary shards differ in size across the ranks (local V = {sizes}): "
                         f"wpkl takes Megatron's layout, equal contiguous shards, so the group's size "
                         f"({len(table)}) must divide the vocabulary (pad it to a multiple)")
    for name in FACTS[1:-1]:
        same(name)
    raise_for(1, values_error)  # (a bad value on one rank also changes its checksum: its own message first)
    same(FACTS[-1])
    return problem, route


def reject(process_group, error: Exception):
    """An option the rank's own specification rejected, before any input was read: this rank joins the agreement
    as a rank that failed (so the others raise too, instead of waiting in a collective), then raises ``error``.
    A group that is no ProcessGroup, or torch.distributed not initialized, can carry nothing: ``error`` at once."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized() and isinstance(process_group, dist.ProcessGroup)):
        raise error

    def prepare():
        raise error

    agree(process_group, prepare, lambda problem: None)
    raise error  # unreachable: agree raises this rank's own error
