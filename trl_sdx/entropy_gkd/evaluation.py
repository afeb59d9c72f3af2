"""How close the student is to the teacher on held-out prompts: the before → after numbers of a distillation run.

- `teacher_references`: the teacher writes a completion for each prompt (greedy, deterministic), once;
- `distillation_gap`: on those teacher-written completions, the per-token forward KL(π_T || π_θ) over the full
  vocabulary and the student's NLL of the teacher's tokens, averaged over completion tokens;
- `answer_accuracy`: the model answers each prompt greedily, graded by `trl_sdx.rewards.boxed_answer_reward`.

`evaluate_student` runs the three on one set of references, so the same teacher text is scored before and after
training and the difference is the student's change alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..rewards import boxed_answer_reward


@dataclass
class TeacherReferences:
    """Prompt token ids (left-padded) with the teacher's greedy completions, for scoring any student on them."""

    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C]: 1 up to and including the teacher's EOS


def _prompt_texts(tokenizer, prompts) -> list[str]:
    if prompts and isinstance(prompts[0], list):  # conversational: the chat template, as the trainer applies it
        return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return list(prompts)


def _encode_prompts(tokenizer, prompts, device):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last prompt token
    try:
        batch = tokenizer(_prompt_texts(tokenizer, prompts), return_tensors="pt", padding=True,
                          add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def _greedy(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy completions and their mask (tokens after the first EOS are padding, masked out)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    completion = output[:, prompt_ids.size(1):]
    is_eos = completion == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # keep the EOS itself: the student should learn to stop
    return completion, (~after_eos).long()


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def teacher_references(teacher, tokenizer, prompts, max_new_tokens: int, batch_size: int = 16) -> TeacherReferences:
    """The teacher's greedy completion of each prompt (conversational prompts go through the chat template)."""
    device = next(teacher.parameters()).device
    prompt_ids, prompt_mask = _encode_prompts(tokenizer, prompts, device)
    completions, masks = [], []
    was_training = teacher.training
    teacher.eval()
    for part in _batches(len(prompts), batch_size):
        completion, mask = _greedy(teacher, tokenizer, prompt_ids[part], prompt_mask[part], max_new_tokens)
        completions.append(F.pad(completion, (0, max_new_tokens - completion.size(1)), value=tokenizer.eos_token_id))
        masks.append(F.pad(mask, (0, max_new_tokens - mask.size(1)), value=0))
    teacher.train(was_training)
    return TeacherReferences(prompt_ids, prompt_mask, torch.cat(completions), torch.cat(masks))


@torch.no_grad()
def _completion_logits(model, refs: TeacherReferences, part: slice) -> torch.Tensor:
    device = next(model.parameters()).device
    input_ids = torch.cat([refs.prompt_ids[part], refs.completion_ids[part]], 1).to(device)
    attention = torch.cat([refs.prompt_mask[part], refs.completion_mask[part]], 1).to(device)
    width = refs.completion_ids.size(1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    return logits[:, -width - 1 : -1].float()  # position t predicts completion token t


@torch.no_grad()
def distillation_gap(student, teacher, refs: TeacherReferences, batch_size: int = 8) -> dict[str, float]:
    """Token-mean forward KL(π_T || π_θ) and student NLL on the teacher's own completions (lower = closer)."""
    kl_sum = nll_sum = tokens = 0.0
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    for part in _batches(refs.completion_ids.size(0), batch_size):
        teacher_logp = F.log_softmax(_completion_logits(teacher, refs, part), -1)
        student_logp = F.log_softmax(_completion_logits(student, refs, part), -1).to(teacher_logp.device)
        mask = refs.completion_mask[part].to(teacher_logp.device).float()
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
        nll = -student_logp.gather(-1, refs.completion_ids[part].to(teacher_logp.device).unsqueeze(-1)).squeeze(-1)
        kl_sum += (kl * mask).sum().item()
        nll_sum += (nll * mask).sum().item()
        tokens += mask.sum().item()
    student.train(modes[0])
    teacher.train(modes[1])
    tokens = max(tokens, 1.0)
    return {"kl_teacher_student": kl_sum / tokens, "student_nll_of_teacher_text": nll_sum / tokens}


@torch.no_grad()
def answer_accuracy(model, tokenizer, prompts, answers, max_new_tokens: int, batch_size: int = 16) -> float:
    """Share of prompts whose greedy completion's last `\\boxed{}` equals the reference answer."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = _encode_prompts(tokenizer, prompts, device)
    was_training = model.training
    model.eval()
    correct = 0
    for part in _batches(len(prompts), batch_size):
        completion, mask = _greedy(model, tokenizer, prompt_ids[part], prompt_mask[part], max_new_tokens)
        texts = [tokenizer.decode(ids[keep.bool()], skip_special_tokens=True) for ids, keep in zip(completion, mask)]
        correct += sum(boxed_answer_reward(texts, list(answers[part])))
    model.train(was_training)
    return correct / max(len(prompts), 1)


def evaluate_student(student, teacher, tokenizer, dataset, refs: TeacherReferences,
                     answer_max_new_tokens: int = 0) -> dict[str, float]:
    """`distillation_gap` on `refs`, plus `answer_accuracy` on `dataset["answer"]` when a token budget is given."""
    result = distillation_gap(student, teacher, refs)
    if answer_max_new_tokens > 0 and "answer" in dataset.column_names:
        result["answer_accuracy"] = answer_accuracy(student, tokenizer, dataset["prompt"], dataset["answer"],
                                                    answer_max_new_tokens)
    return result


class HeldOutEvaluation:
    """Before → after numbers of a trainer's student on held-out prompts, against the trainer's own teacher.

    The teacher's references are written once, at construction, so both measurements score the same text.
    """

    def __init__(self, trainer, dataset, max_new_tokens: int, answer_max_new_tokens: int = 0):
        self.trainer, self.dataset = trainer, dataset
        self.answer_max_new_tokens = answer_max_new_tokens
        self.teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
        self.tokenizer = trainer.processing_class
        self.refs = teacher_references(self.teacher, self.tokenizer, dataset["prompt"], max_new_tokens)

    def measure(self) -> dict[str, float]:
        student = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return evaluate_student(student, self.teacher, self.tokenizer, self.dataset, self.refs,
                                self.answer_max_new_tokens)
