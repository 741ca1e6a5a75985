"""Top-k teachers on vocabulary shards with the Triton kernels: a teacher server's top-k answer against a
tensor-parallel lm_head (wpkl/backends/triton_topk.py's passes on this rank's slice).

    forward   the student pass on the slice (its lse and entropy), ``merge_kernel_stats`` with
              ``divergence=None`` (two all-reduces of float64, [1, N] and [3, N]: the whole vocabulary's lse and
              entropy), the student's logits at the atoms (``gather_atoms``: one all-reduce of [N, K] in the logits' dtype, each
              id's owner supplying it; several teachers: of all their atoms at once), then the atom math of the
              specification on [N, K], alike on every rank
    backward  no collective: the dense part p_v Lambda / T on the slice with the global lse, then the fix-up of
              the atoms this rank holds (their ids as slice columns, the others' -1)

    ShardedTritonTopKPass    one teacher: the vocabulary passes' contract (wpkl/backends/triton_pass.py)
    ShardedTopKMixturePass   several (wpkl.multi_teacher_loss, the plan's "shards-top-k"): one student pass, one
                             merge and one gather for all of them
"""

from __future__ import annotations

from ..backends.triton_topk import TritonTopKMixturePass, dense_and_atoms, topk_forward
from ..spec import LossSpec
from .merge import merge_kernel_stats


def merge_student(stats, valid, temperature: float, shard) -> None:
    """The slice's student lse and entropy in the stats buffer as the whole vocabulary's (in place)."""
    merge_kernel_stats(stats, valid, None, temperature, shard)


class ShardedTritonTopKPass:
    @staticmethod
    def forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec: LossSpec, shard):
        return topk_forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec, shard,
                            merge_student)

    backward = staticmethod(dense_and_atoms)


class ShardedTopKMixturePass:
    def __init__(self, shard):
        self.shard = shard

    def forward(self, student, teachers, valids, spec: LossSpec):
        return TritonTopKMixturePass.forward(student, teachers, valids, spec, self.shard, merge_student)

    backward = staticmethod(TritonTopKMixturePass.backward)
