"""What is benchmarked: shapes, weighting cases, and the inputs every provider shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import wpkl

HALF_LIFE = 256.0
GAMMA = 0.5
TOPK = 64


@dataclass(frozen=True)
class Shape:
    tokens: int  # N = B * T
    vocab: int
    dtype: str = "bfloat16"

    @property
    def batch(self) -> tuple[int, int]:
        """[B, T] with sequences of 1024 tokens (or one shorter sequence)."""
        seq = min(self.tokens, 1024)
        return self.tokens // seq, seq

    @property
    def label(self) -> str:
        return f"N={self.tokens} V={self.vocab} {self.dtype}"


@dataclass(frozen=True)
class Case:
    name: str
    divergence: str
    weighting: wpkl.Weighting | None
    description: str
    options: tuple = ()  # further wpkl options, (name, value) pairs (PowerOPD's sampled_power)
    teachers: int = 1  # mopd: the student against two teachers (wpkl.multi_teacher_loss)
    topk: bool = False  # the teachers are teacher servers' top-k answers (no teacher logits)
    with_logits: bool = False  # a top-k case's first teacher gives its logits instead (mopd_logits_topk)


CASES = {
    "uniform": Case("uniform", "reverse_kl", None, "reverse KL, uniform mean over valid tokens (standard OPD)"),
    "combined": Case("combined", "reverse_kl",
                     wpkl.Weighting(position=wpkl.ExpDecay(HALF_LIFE), confidence=1.0, disagreement=1.0),
                     "reverse KL weighted by position x teacher confidence x disagreement, normalized"),
    "iw_opd": Case("iw_opd", "sampled", wpkl.Weighting(accumulated=GAMMA, normalize=False),
                   "sampled-token IW-OPD (TRL IWOPDTrainer's objective), gamma = 0.5"),
    "topk": Case("topk", "forward_kl", None,
                 f"forward KL against a teacher server's top-{TOPK} log-probs with the tail atom (no teacher logits)",
                 topk=True),
    # the OPD variants (docs/recipes.md, "OPD variants")
    "power_opd": Case("power_opd", "sampled", None, "PowerOPD: sampled-token OPD with the advantage q(y)^5 - p(y)^5",
                      options=(("sampled_power", 5.0),)),
    "tip": Case("tip", "reverse_kl", wpkl.Weighting(token_importance=wpkl.TokenImportance(0.5), normalize=False),
                "TIP: reverse KL on the half of the batch's tokens with the highest entropy-and-divergence score"),
    "mopd": Case("mopd", "reverse_kl", None, "MOPD: reverse KL against two teachers, 1/2 each "
                 "(wpkl.multi_teacher_loss: one pass reads both teachers)", teachers=2),
    "mopd_jsd": Case("mopd_jsd", "jsd", None, "MOPD: jsd (beta 1/2) against two teachers, 1/2 each "
                     "(wpkl.multi_teacher_loss: one pass reads both teachers, twice forward for jsd)", teachers=2),
    "mopd_sampled": Case("mopd_sampled", "sampled", None, "MOPD: sampled-token OPD against two teachers, 1/2 each "
                         "(wpkl.multi_teacher_loss: one student pass, each teacher's row once, one backward)",
                         teachers=2),
    "mopd_topk": Case("mopd_topk", "forward_kl", None, f"MOPD: forward KL against two teacher servers' top-{TOPK} "
                      "log-probs with the tail atom, 1/2 each (wpkl.multi_teacher_loss: one student pass for both)",
                      teachers=2, topk=True),
    "mopd_logits_topk": Case("mopd_logits_topk", "forward_kl", None, "MOPD: forward KL against a teacher's logits "
                             f"and a teacher server's top-{TOPK} log-probs with the tail atom, 1/2 each "
                             "(wpkl.multi_teacher_loss: one pass reads the student for both forms)",
                             teachers=2, topk=True, with_logits=True),
}

# The set that matters (on a GPU): bf16, N in {4096, 16384} x V in {32000, 128256, 151936, 262144}, and fp32.
DEFAULT_SHAPES = [Shape(n, v) for n in (4096, 16384) for v in (32000, 128256, 151936, 262144)] + [
    Shape(4096, 128256, "float32")
]
QUICK_SHAPES = {
    "cuda": [Shape(4096, 32000), Shape(4096, 128256)],
    "cpu": [Shape(256, 8192, "float32"), Shape(2048, 32000, "float32")],
}
SMOKE_SHAPE = Shape(24, 300, "float32")  # the Triton interpreter's correctness smoke on CPU


def parse_shape(text: str) -> Shape:
    """'4096x128256' or '4096x128256:float32'."""
    dims, _, dtype = text.partition(":")
    n, v = (int(x) for x in dims.lower().split("x"))
    return Shape(n, v, dtype or "bfloat16")


@dataclass
class Inputs:
    student: torch.Tensor  # [B, T, V]
    teacher: torch.Tensor  # [B, T, V]
    mask: torch.Tensor  # [B, T] bool, all True: bandwidth figures count every token
    tokens: torch.Tensor  # [B, T] sampled tokens
    topk_ids: torch.Tensor  # [B, T, TOPK]: the teacher's top-k, as a teacher server returns them
    topk_logprobs: torch.Tensor  # [B, T, TOPK] float32
    _second: torch.Tensor | None = None

    def second_teacher(self) -> torch.Tensor:
        """A second teacher for the multi-teacher case (the first one's vocabulary reversed), made once, when first
        asked for (never for the other cases: it is a second [B, T, V] tensor)."""
        if self._second is None:
            self._second = self.teacher.flip(-1)
        return self._second

    def second_topk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The second teacher's top-k answer (ids, log-probs): the first one's of the reversed vocabulary."""
        return self.teacher.shape[-1] - 1 - self.topk_ids, self.topk_logprobs

    def topk_teachers(self, count: int) -> list[dict]:
        """``count`` (1 or 2) top-k teachers as wpkl's teacher arguments."""
        lists = [(self.topk_ids, self.topk_logprobs), self.second_topk()][:count]
        return [dict(teacher_topk_ids=ids, teacher_topk_logprobs=lp) for ids, lp in lists]

    @property
    def labels(self) -> torch.Tensor:
        """TRL's form of the mask: the token, or -100 where ignored."""
        return self.tokens.masked_fill(~self.mask, -100)


def make_inputs(shape: Shape, device: str, seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T = shape.batch
    dtype = getattr(torch, shape.dtype)
    student = torch.randn(B, T, shape.vocab, generator=gen, device=device, dtype=dtype).mul_(2)
    teacher = torch.randn(B, T, shape.vocab, generator=gen, device=device, dtype=dtype).mul_(2)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    tokens = torch.randint(0, shape.vocab, (B, T), generator=gen, device=device)
    k = min(TOPK, shape.vocab)
    top = torch.empty(B, T, k, dtype=torch.float32, device=device), torch.empty(B, T, k, dtype=torch.long, device=device)
    for b in range(B):  # row by row: never a [B, T, V] float32 copy of the teacher
        log_q = torch.log_softmax(teacher[b].float(), dim=-1)
        top[0][b], top[1][b] = log_q.topk(k, dim=-1)
    return Inputs(student, teacher, mask, tokens, top[1], top[0])


def minimal_bytes(shape: Shape, backward: bool) -> int:
    """The stated bytes model: each [N, V] input read once, each [N, V] output written once
    (forward reads student and teacher; forward + backward also writes the student gradient)."""
    size = torch.empty((), dtype=getattr(torch, shape.dtype)).element_size()
    arrays = 3 if backward else 2
    return arrays * shape.tokens * shape.vocab * size


def minimal_bytes_for(case: Case, shape: Shape, backward: bool) -> int:
    """``minimal_bytes``, minus the teacher logits a top-k teacher does not have (its atoms are O(K) per token),
    plus the further teachers' logits of a multi-teacher case (each read once)."""
    size = torch.empty((), dtype=getattr(torch, shape.dtype)).element_size()
    if not case.topk:
        return minimal_bytes(shape, backward) + (case.teachers - 1) * shape.tokens * shape.vocab * size
    lists = case.teachers - case.with_logits  # (a logits teacher beside them: its row read once, forward)
    return ((2 if backward else 1) + case.with_logits) * shape.tokens * shape.vocab * size + \
        lists * shape.tokens * TOPK * 12


def case_teachers(case: Case, inputs: "Inputs") -> list:
    """The case's teachers as wpkl takes them (tensors of logits, or dicts of a teacher server's top-k answer);
    made before timing: inputs, not costs."""
    if case.topk:
        return [inputs.teacher] * case.with_logits + inputs.topk_teachers(case.teachers - case.with_logits)
    return [inputs.teacher, inputs.second_teacher()][:case.teachers]
