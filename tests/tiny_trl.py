"""Tiny, offline building blocks for running real TRL trainers on CPU: tokenizer, models, datasets, configs.

Nothing is downloaded: the tokenizer is a WordLevel ``tokenizers`` model with a jinja chat template, the models are
built from ``Qwen2Config`` with random weights, the datasets are a few in-memory rows.
"""

from __future__ import annotations

import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<pad>", "<eos>", "<unk>"]
WORDS = ["user", "assistant", ":"] + [f"w{i}" for i in range(37)]  # 3 specials + 40 words = a 43-token vocabulary

# Each message ends with <eos>; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def make_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side=padding_side, truncation_side="left",
                                        model_max_length=64)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_lm(tokenizer, *, hidden_size: int, seed: int, name_or_path: str | None = None) -> Qwen2ForCausalLM:
    """A 1-layer Qwen2 causal LM with random weights, float32, on CPU."""
    transformers.set_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).to(torch.float32)
    # Larger logits than the default init (std 0.02) so the student and teacher distributions differ visibly.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if name_or_path is not None:
        model.config._name_or_path = name_or_path
    return model


def _sentence(rng: torch.Generator, lo: int, hi: int) -> str:
    n = int(torch.randint(lo, hi + 1, (1,), generator=rng))
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 37, (n,), generator=rng))


def prompt_dataset(n: int = 4, seed: int = 0) -> Dataset:
    """Conversational prompts only (DistillationTrainer: a "prompt" column), of different lengths."""
    rng = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": _sentence(rng, 1, 4)}] for _ in range(n)]})


def messages_dataset(n: int = 4, seed: int = 0) -> Dataset:
    """Conversations ending with an assistant turn (GKD / IW-OPD: a "messages" column)."""
    rng = torch.Generator().manual_seed(seed)
    rows = [[{"role": "user", "content": _sentence(rng, 1, 4)},
             {"role": "assistant", "content": _sentence(rng, 1, 3)}] for _ in range(n)]
    return Dataset.from_dict({"messages": rows})


def common_args(output_dir) -> dict:
    """TrainingArguments shared by every trainer: one CPU step of batch 2, no reporting, no saving.

    Gradient checkpointing stays at TRL's default (on), as in a real run.
    """
    return dict(
        output_dir=str(output_dir), report_to="none", per_device_train_batch_size=2, gradient_accumulation_steps=1,
        max_steps=1, save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, fp16=False, seed=0,
        learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )


EOS_BIAS = 2.0


def _favor_eos(trainer):
    """Make the sampled completions end early now and then (ragged completion masks), at generation only.

    The bias changes which completions are sampled, not the losses: none of the paths tested here uses the rollout
    log-probabilities (the student's are recomputed by the forward pass).
    """
    eos = trainer.processing_class.eos_token_id
    trainer.generation_config.sequence_bias = {(eos,): EOS_BIAS}
    return trainer


def build_distillation(tmp_path, **overrides):
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = make_tokenizer()
    student = make_lm(tokenizer, hidden_size=16, seed=1)
    teacher = make_lm(tokenizer, hidden_size=24, seed=2)  # wider: each model projects through its own lm_head
    args = DistillationConfig(**common_args(tmp_path / "distillation"), max_completion_length=6, beta=0.5,
                              temperature=0.8, **overrides)
    return _favor_eos(DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                          train_dataset=prompt_dataset(), processing_class=tokenizer))


def build_iw_opd(tmp_path, **overrides):
    from trl.experimental.iw_opd import IWOPDConfig, IWOPDTrainer

    tokenizer = make_tokenizer()
    # IWOPDTrainer loads the teacher's tokenizer from `teacher.config._name_or_path` to check the vocabularies match.
    tokenizer_dir = tmp_path / "teacher_tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    student = make_lm(tokenizer, hidden_size=16, seed=1)
    teacher = make_lm(tokenizer, hidden_size=24, seed=2, name_or_path=str(tokenizer_dir))
    args = IWOPDConfig(**common_args(tmp_path / "iw_opd"), max_length=24, max_completion_length=6, **overrides)
    return _favor_eos(IWOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=messages_dataset(),
                                   processing_class=tokenizer))


def build_gkd(tmp_path, **overrides):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = make_tokenizer()
    student = make_lm(tokenizer, hidden_size=16, seed=1)
    teacher = make_lm(tokenizer, hidden_size=24, seed=2)
    # lmbda=1: every step is on-policy (the student generates the completion).
    args = GKDConfig(**common_args(tmp_path / "gkd"), max_length=24, max_new_tokens=6, lmbda=1.0, beta=0.5,
                     temperature=0.9, **overrides)
    return _favor_eos(GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=messages_dataset(),
                                 processing_class=tokenizer))


class _Captured(Exception):
    pass


def capture_loss_call(trainer):
    """Run ``trainer.train()`` up to its first ``compute_loss`` call and return that call's arguments.

    The inputs are exactly what the trainer feeds ``compute_loss`` (after its own batching, on-policy generation and
    ``num_items_in_batch`` accounting); the call is interrupted before the loss is computed, so no backward or
    optimizer step runs and the student is left unchanged.
    """
    captured = {}

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        captured.update(model=model, inputs=inputs, num_items_in_batch=num_items_in_batch)
        raise _Captured

    trainer.compute_loss = compute_loss
    try:
        trainer.train()
    except _Captured:
        pass
    finally:
        del trainer.compute_loss
    if not captured:
        raise RuntimeError("trainer.train() never called compute_loss")
    return captured["model"], captured["inputs"], captured["num_items_in_batch"]
