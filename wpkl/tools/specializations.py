"""The specializations wpkl launches, as compile jobs: one ``Job`` per distinct binary (representative
vocabularies sharing a launch config compile once), and each job's (kernel, args, meta) built by the package's own
launch builders from [4, 1024, V] meta tensors, with Triton's own specialization rules for the signature."""

from __future__ import annotations

from dataclasses import dataclass

ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled")
SAMPLED_VARIANTS = ("teacher logits", "teacher logits + rollout", "teacher logprobs", "teacher logprobs + rollout",
                    "teacher logprobs + rollout + power")  # power: PowerOPD's advantage (sampled_power)
WEIGHTS_REDUCTIONS = ("mean", "sum", "seq_mean", "none")
TOPK_SIZES = (64, 100)  # a power of two, and a K whose block is masked
MIXTURE_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
MIXTURE_TEACHERS, MIXTURE_VOCAB = (2, 4), 128256  # two teachers (KB = 2), and the largest group (KB = 4: 3 or 4)
MIXTURE_JSD_TEACHERS = (2,)  # jsd's groups hold two (wpkl/backends/triton_mixture.py: MAX_JSD_TEACHERS)
# With top-k teachers (wpkl/backends/triton_logits_topk.py) the logits launch may hold one teacher, its backward
# adds their dense part ("dense"), and the atoms kernel ("mixture_atoms") rewrites their merged atom columns.


def mixture_variants(kernel: str, divergence: str, quick: bool = False) -> list[str]:
    """The teacher counts (KB) and backward forms of the mixture kernels' launches (``quick``: with top-k
    teachers, the one-teacher and the largest groups only, which hold the gated and the largest register counts)."""
    counts = MIXTURE_JSD_TEACHERS if divergence == "jsd" else MIXTURE_TEACHERS
    with_topk = (1, counts[-1]) if quick else (1, *counts)
    if kernel == "mixture_fwd":
        return [f"K={k}" for k in (1, *counts)]
    if kernel == "mixture_jsd_partials":  # jsd teachers on vocabulary shards (a first launch of one: top-k beside)
        return [f"K={k}" for k in (1, *MIXTURE_JSD_TEACHERS)] if divergence == "jsd" else []
    if kernel == "mixture_atoms":  # the top-k teachers' merged atoms: a block that is masked, and the largest
        from wpkl.backends.triton_topk import MAX_ATOM_BLOCK

        masked = (1,) if quick else (1, *counts)
        return [f"K={k} A={TOPK_SIZES[-1]}" for k in masked] + [f"K={counts[-1]} A={MAX_ATOM_BLOCK}"]
    return [f"K={k}" for k in counts] + [f"K={k} dense" for k in with_topk]
TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "i8", "int32": "i32", "int64": "i64"}


@dataclass(frozen=True)
class Job:
    kernel: str  # "fwd", "bwd", "jsd_partials", "weights", "topk", "mixture_fwd", "mixture_bwd", "mixture_atoms"
    # or "mixture_jsd_partials"
    divergence: str  # the weights kernel: its reduction
    dtype: str
    vocabs: tuple[int, ...]  # representative V values sharing this specialization; the first is compiled
    arch: int
    variant: str = ""  # "sampled": where log q(y) and the behaviour log p(y) come from


def launch(job: Job):
    """(kernel function, args, meta) exactly as the package launches them."""
    import torch

    from wpkl import kernels
    from wpkl.backends.common import divergence_id
    from wpkl.backends.triton_pass import backward_launch, forward_launch
    from wpkl.backends.triton_topk import topk_atoms_meta
    from wpkl.backends.weights_kernel import encode_weighting, weights_launch

    dtype = getattr(torch, job.dtype)
    B, T = 4, 1024  # a [B, T, V] batch of N = 4096 tokens
    meta_tensor = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    student, teacher = meta_tensor(B, T, job.vocabs[0]), meta_tensor(B, T, job.vocabs[0])
    valid = meta_tensor(B * T, dt=torch.int8)
    tokens = meta_tensor(B * T, dt=torch.int64) if job.divergence == "sampled" else None
    stats = meta_tensor(kernels.NUM_STATS, B * T, dt=torch.float32)
    per_token = meta_tensor(B * T, dt=torch.float32)
    teacher_logprobs = per_token if "teacher logprobs" in job.variant else None
    rollout = per_token if "rollout" in job.variant else None
    if teacher_logprobs is not None:
        teacher = None
    if job.kernel == "weights":  # the [N] weights kernel: the reduction in ``divergence``, every option on
        N = B * T
        f32 = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
        table = f32(8) if "table" in job.variant else None
        from wpkl.weighting import PositionSigmoid, PositionTable, PositionWindow, Weighting

        position = (PositionTable([1.0] * 8) if table is not None else PositionSigmoid() if "sigmoid" in job.variant
                    else PositionWindow(0.25, 0.75))
        code = encode_weighting(Weighting(position=position, confidence=1.0, disagreement=0.5, accumulated=0.5,
                                          w_max=1.5))
        _, args, meta, _ = weights_launch(
            f32(N, dt=torch.int8), f32(N), f32(N), f32(N), weighting=code, table=table, reduction=job.divergence,
            segments=1 if "packed" in job.variant else 0, row_length=T, vocab=job.vocabs[0], user_weights=f32(N),
            positions=f32(N, dt=torch.int64), tokens=f32(N, dt=torch.int64), teacher_logprobs=f32(N),
            rollout_logprobs=f32(N), num_items_in_batch=f32(1) if job.divergence == "mean" else None)
        return kernels.token_weights_kernel, args, meta
    if job.kernel == "topk":  # the top-k teacher's atom fix-up (kernels/token_topk.py): K in ``variant``
        K = int(job.variant.split()[0].removeprefix("K="))
        N = B * T
        f32 = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
        grad = meta_tensor(B, T, job.vocabs[0])
        args = (f32(N, K, dt=torch.int64), f32(N, K), f32(N, K), stats, f32(N), valid, grad, N, K, T, job.vocabs[0],
                grad.stride(0), grad.stride(1), 1.0)
        return kernels.topk_atoms_bwd_kernel, args, topk_atoms_meta(K)
    div_id = divergence_id(job.divergence)  # every divergence here is exact at beta 0.5
    if job.kernel.startswith("mixture"):  # several teachers' logits in one pass (kernels/token_mixture.py)
        from wpkl.backends.triton_mixture import backward_launch as mixture_bwd, forward_launch as mixture_fwd

        K = int(job.variant.split()[0].removeprefix("K="))
        teachers = [meta_tensor(B, T, job.vocabs[0]) for _ in range(K)]
        f32 = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
        valid, per_token, stats = f32(K, B * T, dt=torch.int8), f32(K, B * T), f32(K, kernels.NUM_STATS, B * T)
        if job.kernel == "mixture_fwd":
            _, args, meta = mixture_fwd(student, teachers, valid, per_token, stats, div_id, 1.0)
            return kernels.token_mixture_fwd_kernel, args, meta
        if job.kernel == "mixture_jsd_partials":
            from wpkl.backends.triton_mixture import jsd_partials_launch

            _, args, meta = jsd_partials_launch(student, teachers, valid, stats, f32(K, 4, B * T), 1.0, 0.5)
            return kernels.token_mixture_jsd_partials_kernel, args, meta
        if job.kernel == "mixture_atoms":
            from wpkl.backends.triton_mixture import atoms_launch

            A = int(job.variant.split()[1].removeprefix("A="))
            _, args, meta = atoms_launch(student, teachers, valid, per_token, f32(B * T), stats,
                                         f32(B * T, A, dt=torch.int64), f32(B * T, A), f32(B * T, A),
                                         f32(B * T, dt=torch.int8), student, div_id, 1.0)
            return kernels.token_mixture_atoms_kernel, args, meta
        dense = f32(B * T) if "dense" in job.variant else None
        _, args, meta = mixture_bwd(student, teachers, valid, per_token, stats, student, div_id, 1.0, dense=dense)
        return kernels.token_mixture_bwd_kernel, args, meta
    if job.kernel == "jsd_partials":  # jsd's second pass on a vocabulary slice (wpkl/parallel/merge.py)
        from wpkl.backends.triton_pass import jsd_partials_launch

        _, args, meta = jsd_partials_launch(student, teacher, valid, stats, stats[:4], 0.5, 1.0)
        return kernels.token_jsd_partials_kernel, args, meta
    if job.kernel == "fwd":
        _, args, meta = forward_launch(student, teacher, valid, tokens, teacher_logprobs, rollout, per_token,
                                                stats, div_id, 0.5, 1.0, 5.0 if "power" in job.variant else None)
        return kernels.token_divergence_fwd_kernel, args, meta
    grad = meta_tensor(B, T, job.vocabs[0])
    _, args, meta = backward_launch(student, teacher, valid, tokens, per_token, stats, grad, div_id, 0.5, 1.0)
    return kernels.token_divergence_bwd_kernel, args, meta


def specialize(fn, args, meta):
    """Triton's own specialization rules: pointers and ints divisible by 16 get tt.divisibility=16
    (torch allocations are 16-byte aligned), and an int equal to 1 becomes a constant."""
    constexprs, attrs, signature = dict(meta), {}, {}
    num_warps = constexprs.pop("num_warps")
    # args holds the runtime arguments only: the trailing constexpr names of arg_names come from meta.
    for index, (name, value) in enumerate(zip(fn.arg_names, args, strict=False)):
        if hasattr(value, "dtype"):
            signature[name] = "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constexprs, attrs, num_warps


def jobs(archs=ARCHS, quick=False) -> list[Job]:
    """One job per distinct specialization: representative vocabularies sharing one compile once.

    ``quick``: the large vocabularies (V >= 32000), which include every specialization the gates name, and
    bf16 at V = 97 (one block longer than the vocabulary, one warp).
    """
    from wpkl.backends.launch import REPRESENTATIVE_VOCABS, launch_config

    out = []
    for dtype in DTYPES:
        size = 4 if dtype == "float32" else 2
        by_key: dict = {}
        for vocab in REPRESENTATIVE_VOCABS:
            if quick and vocab < 32000 and (dtype, vocab) != ("bfloat16", 97):
                continue
            # The launch config and Triton's specialization of V (divisible by 16, or equal to 1) decide the binary.
            by_key.setdefault((launch_config(vocab, size), vocab % 16 == 0, vocab == 1), []).append(vocab)
        if dtype == "float32":  # the weights kernel works on float32 [N] vectors whatever the logits' dtype
            out += [Job("weights", reduction, dtype, (32000,), arch, variant) for reduction in WEIGHTS_REDUCTIONS
                    for variant in ("window", "packed table", "sigmoid") for arch in archs]
        # A top-k teacher: the forward and dense backward are the "sampled" specializations below (no teacher
        # logits, token -1); the atoms' fix-up writes the gradient's dtype at K ids.
        out += [Job("topk", "atoms", dtype, (151936,), arch, f"K={K}") for K in TOPK_SIZES for arch in archs]
        for vocabs in sorted(by_key.values(), key=max):
            if MIXTURE_VOCAB in vocabs:  # several teachers' pass, at the one vocabulary its gates name
                out += [Job(kernel, divergence, dtype, tuple(vocabs), arch, variant)
                        for kernel in ("mixture_fwd", "mixture_bwd", "mixture_atoms", "mixture_jsd_partials")
                        for divergence in MIXTURE_DIVERGENCES
                        for variant in mixture_variants(kernel, divergence, quick) for arch in archs]
            if MIXTURE_VOCAB in vocabs:  # jsd on vocabulary shards: its second pass, at the gates' vocabulary
                out += [Job("jsd_partials", "jsd", dtype, tuple(vocabs), arch) for arch in archs]
            for kernel in ("fwd", "bwd"):
                for divergence in DIVERGENCES:
                    # Only the sampled forward reads its teacher and behaviour log-probs in several ways.
                    variants = SAMPLED_VARIANTS if (divergence, kernel) == ("sampled", "fwd") else ("",)
                    out += [Job(kernel, divergence, dtype, tuple(vocabs), arch, variant)
                            for variant in variants for arch in archs]
    return out
