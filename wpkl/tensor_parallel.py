"""Vocabulary parallelism (Megatron's tensor-parallel lm_head): the loss from vocabulary shards, never gathering
[N, V].

Rank r of a group of R ranks holds the contiguous vocabulary slice ``[r * V_local, (r + 1) * V_local)`` of the
student's logits (or lm_head rows) and of the teacher's: equal shards, the whole vocabulary ``V = R * V_local``.
Token ids (``tokens``, ``teacher_topk_ids``) are global. Every rank gets the same loss, the same TokenStats and
the same weights; the gradient of the student logits (lm_head weight, bias) is the rank's slice of the
full-vocabulary gradient, and the hidden states' gradient (fused-linear form) is the full one, summed over the
group here.

How (docs/design.md, "Vocabulary parallelism", has the collectives and bytes per call):

- the torch pass: the per-token math of wpkl/reference.py runs on each rank's slice with a ``VocabShard``
  (below) combining its per-row vocabulary sums and maxima over the group (all-reduces of [rows]-sized
  tensors). Gradients follow Megatron's conjugate operators: ``sum`` (forward all-reduce, backward identity:
  every rank computes the same loss from the sum) and ``copy`` (forward identity, backward all-reduce: where
  the summed log-normalizer enters the slice's own log-probabilities), so autograd gives each rank its slice's
  gradient.
- the Triton kernels (``ShardedTritonPass``): the forward kernel on the slice, its per-token statistics merged
  over the group (``merge_kernel_stats``: two all-reduces), the unchanged backward kernel on the slice with the
  merged statistics (no collective in backward). jsd and top-k teachers take the torch pass.

Weighting and reduction then run on the combined per-token terms, in torch, identically on every rank.

Before any of these, one all-gather of a few integers per rank (``agree``) checks that the ranks agree on the
shapes and options, and that none rejected its inputs: a bad input raises on every rank, never leaving the
others waiting in a collective.
"""

from __future__ import annotations

import zlib

import torch

from .reference import exact_divergence

# The options the ranks must agree on (their number of collectives depends on them), in the order ``agree``
# reports them.
_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FIELDS = ("prepared", "values checked", "local vocabulary", "teacher's local vocabulary", "leading dimensions",
           "leading size 0", "leading size 1", "top-k K", "student dtype", "teacher dtype", "requires_grad",
           "backend", "options", "mask and tokens")


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


def check_group_type(process_group) -> None:
    """A ProcessGroup or None (what the modules check at construction)."""
    if process_group is None:
        return
    dist = _dist()
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")


def check_group(process_group) -> None:
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group needs torch.distributed initialized (init_process_group)")
    check_group_type(process_group)


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
            _DTYPES.index(student.dtype), 0 if teacher is None else _DTYPES.index(teacher.dtype),
            int(grad and torch.is_grad_enabled()),  # whether the torch pass runs the copy's backward in forward
            ("torch", "reference", "triton").index(backend), zlib.crc32(repr(options).encode())]


def _checksum(problem) -> torch.Tensor:
    """An int64 digest of the mask and the sampled tokens, which decide every rank's per-token collectives and
    must be the same on every rank (the ranks' masks differing would give each rank a different loss)."""
    valid = problem.valid.reshape(-1).to(torch.int64)
    index = torch.arange(1, valid.numel() + 1, device=valid.device, dtype=torch.int64)
    digest = (valid * index).sum()
    if problem.tokens is not None:
        tokens = torch.where(valid.bool(), problem.tokens.reshape(-1).to(torch.int64), 0)
        digest = digest + (tokens * (index * 40503 + 7)).sum()
    if problem.topk_ids is not None:
        ids = problem.topk_ids.reshape(valid.numel(), -1).to(torch.int64)
        digest = digest + (ids * valid.unsqueeze(-1) * (index.unsqueeze(-1) * 65599 + 3)).sum()
    return digest


def agree(process_group, prepare, check_values):
    """Validate on every rank, then agree: ``prepare()`` -> (problem, resolved backend, options: a list of ints
    that every rank must share); ``check_values(problem)`` the value checks (after the shard is set, for the
    global vocabulary). One all-gather of ``len(_FIELDS)`` int64 per rank (and one host sync) carries each rank's
    outcome and shapes; if any rank rejected its inputs or the ranks disagree, every rank raises.

    Returns (problem with ``problem.shard`` set, resolved backend)."""
    dist = _dist()
    check_group(process_group)
    error, values_error, problem, resolved, facts = None, None, None, None, [0] * (len(_FIELDS) - 3)
    try:
        problem, resolved, options = prepare()
        facts = _facts(problem, resolved, options)
        problem.shard = VocabShard(process_group, facts[0])
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        error = e
    if error is None:
        try:
            check_values(problem)
        except Exception as e:  # noqa: BLE001 - as above
            values_error = e
    mine = torch.tensor([int(error is None), int(values_error is None), *facts, 0], dtype=torch.int64,
                        device=_device(process_group, None if problem is None else problem.device))
    if error is None:
        mine[-1] = _checksum(problem).to(mine.device)  # device ops: read with the table, no extra sync
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
    def same(column: int):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            what = _FIELDS[column]
            raise ValueError(f"process_group: the ranks disagree on the {what} of their inputs ({values}): every rank "
                             "passes the same tokens, mask and options, and its own vocabulary slice")

    for column in range(3, len(_FIELDS) - 1):
        same(column)
    raise_for(1, values_error)  # (a bad value on one rank also changes its checksum: its own message first)
    same(len(_FIELDS) - 1)
    return problem, resolved


# ------------------------------------------------------------------------------------ the Triton kernels

def local_tokens(tokens: torch.Tensor | None, shard: VocabShard) -> torch.Tensor | None:
    """Global token ids as this rank's column indices, -1 where another rank holds the token (the backward
    kernel's one-hot then never fires, and the forward kernel reads nothing there)."""
    if tokens is None:
        return None
    local = tokens - shard.offset
    return torch.where((local >= 0) & (local < shard.size), local, -1)


def _owned_logit(x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Raw logits x[..., local] in float64 (x: [..., V], local: its leading shape), 0 where local = -1."""
    value = x.gather(-1, local.clamp_min(0).unsqueeze(-1)).squeeze(-1).double()
    return torch.where(local >= 0, value, 0.0)


def _stat_rows():
    """The rows of the kernels' statistics buffer (kernels/common.py), as plain ints."""
    from types import SimpleNamespace

    from .kernels import common

    return SimpleNamespace(**{name: int(getattr(common, name).value) for name in dir(common)
                              if name.startswith("STAT_")})


def merge_kernel_stats(stats: torch.Tensor, valid: torch.Tensor, divergence: str, temperature: float, shard,
                       s_y=None, u_y=None, teacher_logprobs=None, rollout_logprobs=None) -> torch.Tensor:
    """The whole vocabulary's per-token statistics from each rank's forward-kernel statistics of its slice.

    Each rank's kernel ran on its slice as if it were the whole vocabulary: its statistics are those of the
    slice's own softmax p_r (log-normalizer l_r, entropy H_r, mean a_r = E_{p_r}[s - u], max q_r). With
    w_r = exp(l_r - l) the share of the slice in the global softmax (l = logsumexp_r l_r), the global ones are

        E_p[f] = sum_r w_r E_{p_r}[f]          H(p) = sum_r w_r H_r - sum_r w_r log w_r
        max q = exp(max_r (l_r + log max q_r) - l)

    A KL merges by the chain rule from the slices' own D_r and exact lse gaps (below: no difference of rounded
    normalizers); "sampled" follows kernels/common.py's finalize_token, from log p(y) = s_y / T - lse_s (and
    log q(y) likewise, or given). Two all-reduces of float64 (the maxima [m, N], then the sums [k, N]). ``stats``: the kernel's [NUM_STATS, N] buffer, overwritten with the global statistics (what
    the backward kernel reads, raw logit units) and returned; the loss [N] is returned alongside.
    ``s_y``, ``u_y``: the raw logits at the sampled tokens on the rank that holds them, 0 elsewhere (float64).
    """
    k = _stat_rows()
    T = temperature
    teacher = divergence != "sampled" or u_y is not None
    f64 = stats.double()
    ls, lu = f64[k.STAT_STUDENT_LSE] / T, f64[k.STAT_TEACHER_LSE] / T  # natural units of s / T
    has_s, has_u = ls > float("-inf"), lu > float("-inf")  # a slice of all -inf logits has no share
    log_conf = torch.where(has_u, f64[k.STAT_CONFIDENCE].log() + lu, float("-inf"))  # max_j u_j / T of the slice
    # The slice's lse_s - lse_u, from the kernel's shifted sums: exact where p_r ~ q_r, where the difference of
    # the separately rounded float32 log-normalizers would not be (see the KL merge below).
    both = has_s & has_u
    gap = torch.where(both, f64[k.STAT_LSE_GAP] / T, float("-inf"))
    kl = divergence in ("reverse_kl", "forward_kl")
    # (KL: also whether some slice has one side's mass and not the other's: the divergence is then infinite)
    one_sided = [(has_s & ~has_u).double(), (has_u & ~has_s).double()] if kl else []
    maxima = shard.max(torch.stack([ls, lu, log_conf] + ([gap] if kl else []) + one_sided))
    finite = torch.isfinite(maxima)
    m_s, m_u, m_c = torch.where(finite, maxima, 0.0).unbind(0)[:3]
    a = torch.where(has_s, (ls - m_s).exp(), 0.0)
    b = torch.where(has_u, (lu - m_u).exp(), 0.0)

    def weighted(weight, x):  # 0 where the slice has no share (its own statistics are NaN there)
        return torch.where(weight > 0, weight * x, 0.0)

    parts = [a, weighted(a, f64[k.STAT_STUDENT_ENTROPY]), weighted(a, ls - m_s)]
    if teacher:
        parts += [b, weighted(b, f64[k.STAT_TEACHER_ENTROPY]), weighted(b, lu - m_u)]
    if kl:
        # The KL of the merged distributions as the slices' own KLs plus the KL of the slices' shares (chain rule):
        # reverse  D = sum_r alpha_r D_r + sum_r alpha_r g_r - G,   forward  D = sum_r beta_r D_r + G - sum_r beta_r g_r
        # with beta_r = b_r / z_u the teacher's share of slice r, g_r its lse gap, G = log sum_r beta_r e^{g_r} the
        # global gap and alpha_r = beta_r e^{g_r - G} the student's share. Every term is computed from the gaps and
        # the slices' divergences, never from a difference of rounded normalizers: exact for close distributions.
        m_g = torch.where(finite[3], maxima[3], 0.0)
        c = weighted(b, (gap - m_g).exp())  # beta_r e^{g_r - m_g} z_u: alpha_r up to normalization
        mine = c if divergence == "reverse_kl" else b
        parts += [c, weighted(mine, f64[k.STAT_DIVERGENCE]), weighted(mine, gap - m_g),
                  weighted(a if divergence == "reverse_kl" else b, f64[k.STAT_AUX])]
    if divergence == "sampled":
        parts += [s_y] + ([u_y] if u_y is not None else [])
    sums = shard.sum(torch.stack(parts))
    z_s, e_s, g_s = sums[0], sums[1], sums[2]
    lse_s = m_s + z_s.log()
    student_entropy = (e_s - g_s) / z_s + z_s.log()
    nan = torch.full_like(lse_s, float("nan"))
    lse_u, teacher_entropy, confidence = torch.zeros_like(lse_s), nan, nan
    if teacher:
        z_u, e_u, g_u = sums[3], sums[4], sums[5]
        lse_u = m_u + z_u.log()
        teacher_entropy = (e_u - g_u) / z_u + z_u.log()
        confidence = (m_c - lse_u).exp()
    aux = torch.zeros_like(lse_s)
    lse_gap = lse_s - lse_u
    if kl:
        z_c, d_sum, g_sum, aux_sum = sums[6], sums[7], sums[8], sums[9]
        lse_gap = m_g + (z_c / z_u).log()  # G = log sum_r beta_r e^{g_r}
        weight_sum = z_c if divergence == "reverse_kl" else z_u
        shares_kl = g_sum / weight_sum - (lse_gap - m_g)  # sum_r alpha_r g_r - G (reverse) or its beta mean
        if divergence == "reverse_kl":
            aux = aux_sum / z_s
            divergence_value = d_sum / z_c + shares_kl
        else:
            aux = aux_sum / z_u
            divergence_value = d_sum / z_u - shares_kl
        # A slice where one side has mass and the other none: the divergence is infinite (the kernel's own D_r
        # of such a slice is not a share of anything).
        infinite = maxima[4 if divergence == "reverse_kl" else 5] > 0
        divergence_value = torch.where(infinite, float("inf"), divergence_value)
        loss = divergence_value
    else:  # sampled
        rest = sums[6:] if teacher else sums[3:]
        log_p_y = rest[0] / T - lse_s
        log_q_y = rest[1] / T - lse_u if teacher else teacher_logprobs.double()
        behaviour = log_p_y if rollout_logprobs is None else rollout_logprobs.double()
        divergence_value = behaviour - log_q_y
        loss = divergence_value * log_p_y
    rows = {k.STAT_DIVERGENCE: divergence_value, k.STAT_CONFIDENCE: confidence,
            k.STAT_STUDENT_ENTROPY: student_entropy, k.STAT_TEACHER_ENTROPY: teacher_entropy,
            k.STAT_STUDENT_LSE: lse_s * T, k.STAT_TEACHER_LSE: lse_u * T, k.STAT_AUX: aux,
            k.STAT_LSE_GAP: lse_gap * T}
    for row, value in rows.items():
        stats[row] = torch.where(valid, value, 0.0).to(stats.dtype)
    return torch.where(valid, loss, 0.0).float()


class ShardedTritonPass:
    """wpkl/vocab_pass.py's contract (forward, backward) for a vocabulary slice, with the Triton kernels: the
    forward kernel on the slice, ``merge_kernel_stats`` (two all-reduces), and the unchanged backward kernel on
    the slice with the merged statistics (no collective: the per-token statistics are all it needs).
    reverse_kl, forward_kl and sampled; jsd's second pass needs the global normalizers inside the kernel (the
    torch pass runs it)."""

    @staticmethod
    def forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec):
        from .vocab_pass import TritonPass, _kernels

        shard = spec.shard
        divergence = exact_divergence(spec.divergence, spec.beta)
        if divergence == "jsd":
            raise ValueError("vocabulary-parallel jsd runs on the torch path (wpkl/api.py routes it there)")
        B, T, _ = student.shape
        local = local_tokens(tokens, shard)
        _, _, saved = TritonPass.forward(student, teacher, valid, local, teacher_logprobs, rollout_logprobs, spec)
        s_y = u_y = None
        if divergence == "sampled":
            # Gathered from the [B, T, V] views as they are (a reshape would copy strided logits).
            s_y = _owned_logit(student, local.view(B, T)).reshape(-1)
            if teacher is not None:
                u_y = _owned_logit(teacher[..., :student.shape[-1]], local.view(B, T)).reshape(-1)
        per_token = [None if x is None else x.reshape(-1) for x in (teacher_logprobs, rollout_logprobs)]
        loss = merge_kernel_stats(saved.stats, valid.reshape(-1), divergence, spec.temperature, shard, s_y, u_y,
                                  *per_token)
        k = _kernels()
        return loss.view(B, T), saved.stats[: k.NUM_PUBLIC_STATS].view(k.NUM_PUBLIC_STATS, B, T), saved

    @staticmethod
    def backward(saved, coef, out):
        from .vocab_pass import TritonPass

        return TritonPass.backward(saved, coef, out)


class ShardedTritonTerms(torch.autograd.Function):
    """Materialized logits on the Triton kernels, vocabulary-parallel: per-token loss [B, T] (differentiable)
    and the public stats [4, B, T]; weighting and reduction follow in torch (wpkl/api.py)."""

    @staticmethod
    def forward(ctx, student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec):
        loss, stats, saved = ShardedTritonPass.forward(student, teacher, valid, tokens, teacher_logprobs,
                                                       rollout_logprobs, spec)
        ctx.saved_pass = saved
        ctx.mark_non_differentiable(stats)
        return loss, stats.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        saved = ctx.saved_pass
        out = ShardedTritonPass.backward(saved, grad_loss, torch.empty_like(saved.student))
        return out, *(None,) * 6
