"""Every ```python block of the README and docs/recipes.md runs as written.

Blocks of one document run in order in one namespace (a later block may use what an earlier one defined),
which starts with the few names the prose says come from the reader's own training code: tiny models, a
batch, a real TRL trainer, a one-process torch.distributed group. Nothing else is added to the code.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# transformers 5.x renames gradient checkpointing, which TRL 1.16 turns on by default: library deprecation notices.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")

ROOT = Path(__file__).resolve().parent.parent
V, V_TEACHER = 43, 48  # the teacher's vocabulary is padded


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


class TinyLM(torch.nn.Module):
    """A stand-in for a Hugging Face causal LM: ``model(input_ids, ...)`` returns an object with ``.logits``."""

    def __init__(self, vocab, dim=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(V, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def _batch(B=3, T=10, prompt_len=3):
    input_ids = torch.randint(0, V, (B, T))
    completion_mask = torch.ones(B, T - prompt_len, dtype=torch.long)
    completion_mask[1, 4:] = 0
    return input_ids, prompt_len, completion_mask


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets save to relative paths (run/position_bias.pt)
    return tmp_path


def _world():
    import torch.distributed as dist

    return dist.group.WORLD


@pytest.fixture
def single_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_readme_snippets(in_tmp, single_process_group):
    pytest.importorskip("trl", reason="trl is not installed")
    import tiny_trl

    input_ids, prompt_len, completion_mask = _batch()
    B, T = completion_mask.shape
    namespace = dict(model=TinyLM(V), teacher=TinyLM(V_TEACHER, seed=1), input_ids=input_ids, prompt_len=prompt_len,
                     completion_mask=completion_mask, trainer=tiny_trl.build_gkd(in_tmp), step=0,
                     student_hidden=torch.randn(B, T, 8, requires_grad=True), student_lm_head=torch.nn.Linear(8, V),
                     teacher_hidden=torch.randn(B, T, 12), teacher_lm_head=torch.nn.Linear(12, V_TEACHER),
                     ids=torch.argsort(torch.rand(B, T, V), dim=-1)[..., :5],
                     logprobs=-torch.rand(B, T, 5) * 4)
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 3
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    assert namespace["trainer"].wpkl_weighting == namespace["wpkl"].Weighting(accumulated=0.5)
    assert (in_tmp / "run" / "position_bias.pt").exists()
    assert namespace["student_logits"].grad_fn is not None and torch.isfinite(namespace["loss"])
    assert namespace["student_hidden"].grad is not None and namespace["student_lm_head"].weight.grad is not None


@pytest.mark.slow
def test_recipes_snippets(in_tmp, single_process_group):
    pytest.importorskip("trl", reason="trl is not installed")
    import tiny_trl

    B, T = 4, 7
    response_mask = torch.rand(B, T) < 0.8
    micro_batches = [SimpleNamespace(student_logits=torch.randn(2, T, V, requires_grad=True),
                                     teacher_logits=torch.randn(2, T, V_TEACHER), response_mask=response_mask[i:i + 2])
                     for i in (0, 2)]
    student_logits = torch.randn(B, T, V, requires_grad=True)
    responses = torch.randint(0, V, (B, T))
    import wpkl

    trainer = tiny_trl.build_iw_opd(in_tmp)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    namespace = dict(trainer=trainer, model=TinyLM(V), response_mask=response_mask, micro_batches=micro_batches,
                     weighting=wpkl.Weighting(accumulated=0.5, normalize=False), monitor=wpkl.audit.PositionBiasMonitor(),
                     step=0, student_logits=student_logits, teacher_logits=torch.randn(B, T, V_TEACHER),
                     responses=responses, teacher_token_logprobs=-torch.rand(B, T) * 3,
                     old_log_probs=-torch.rand(B, T) * 3,
                     # the MOPD recipe: a logits teacher and a top-k one, a teacher per sequence
                     teacher_id=torch.tensor([0, 1, 1, 0]), math_logits=torch.randn(B, T, V_TEACHER),
                     code_ids=torch.rand(B, T, V).argsort(-1)[..., :4], code_logprobs=-torch.rand(B, T, 4) * 3 - 1.5,
                     # the context-parallel recipe (after "From hidden states": [2, 7] tokens), on a one-rank
                     # group (the whole batch is the rank's)
                     local_mask=response_mask[:2], local_positions=torch.arange(T).expand(2, T),
                     local_sequence_ids=torch.arange(2).unsqueeze(1).expand(2, T), cp_group=_world(),
                     num_sequences=2, max_seq_len=T)
    blocks = python_blocks(ROOT / "docs" / "recipes.md")
    assert len(blocks) >= 5
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/recipes.md python block {i}", "exec"), namespace)

    # The TRL block trained a real step through wpkl; the verl-style block put gradients on every micro-batch.
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert all(m.student_logits.grad is not None for m in micro_batches)
    assert (in_tmp / "run" / "position_bias.pt").exists()

    # The Hugging Face Trainer recipe defines a class: use it on a batch, as Trainer.training_step would.
    import transformers

    args = transformers.TrainingArguments(output_dir=str(in_tmp / "hf"), use_cpu=True, report_to="none")
    hf = namespace["DistillTrainer"](model=TinyLM(V), args=args, teacher=TinyLM(V_TEACHER, seed=1),
                                     weighting=wpkl.Weighting(position=wpkl.ExpDecay(4.0)))
    input_ids, _, _ = _batch()
    labels = input_ids.clone()
    labels[:, :3] = -100
    loss = hf.compute_loss(hf.model, dict(input_ids=input_ids, labels=labels), num_items_in_batch=torch.tensor(12))
    loss.backward()
    assert torch.isfinite(loss) and hf.model.head.weight.grad is not None

    # The OPD variants' Trainer classes (EOPD, MOPD), on the same batch, against the calls they stand for.
    mask = labels[:, 1:] != -100
    eopd = namespace["EOPDTrainer"](model=TinyLM(V), args=args, teacher=TinyLM(V_TEACHER, seed=1))
    loss = eopd.compute_loss(eopd.model, dict(input_ids=input_ids, labels=labels.clone()))
    with torch.no_grad():
        student, teacher = (m(input_ids).logits[:, :-1] for m in (eopd.model, eopd.teacher))
    expected = wpkl.entropy_gated_loss(student, teacher, mask=mask, divergence="sampled", tokens=input_ids[:, 1:])
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert eopd.model.head.weight.grad is not None
    teachers = [TinyLM(V_TEACHER, seed=1), TinyLM(V, seed=2)]  # (a padded vocabulary and an exact one)
    mopd = namespace["MOPDTrainer"](model=TinyLM(V), args=args, teachers=teachers)
    teacher_id = torch.tensor([1, 0, 1])
    loss = mopd.compute_loss(mopd.model, dict(input_ids=input_ids, labels=labels.clone(), teacher_id=teacher_id),
                             num_items_in_batch=torch.tensor(12))
    with torch.no_grad():
        student = mopd.model(input_ids).logits[:, :-1]
        per_row = [wpkl.weighted_kl_loss(student[b:b + 1], teachers[int(k)](input_ids[b:b + 1]).logits[:, :-1],
                                         mask=mask[b:b + 1], reduction="sum") for b, k in enumerate(teacher_id)]
    torch.testing.assert_close(loss.detach(), sum(per_row) / 12)  # each row its own teacher's, the global count
    loss.backward()
    assert mopd.model.head.weight.grad is not None
