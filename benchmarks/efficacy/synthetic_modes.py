"""A synthetic task whose teacher is genuinely multi-modal at known positions, and how to score a student on it.

Prompt i is the 4-token text `#XY=` (X, Y two capital letters; every prompt tokenises to the same length, so no
padding shifts positions). Its valid completions are `m m <|im_end|>` for the K letters m of a fixed set S_i
(drawn per prompt from the 16 single-token letters a..p). Position 0 of the completion is therefore the known
multi-modal position: a teacher that has learnt the task puts ≈ 1/K on each valid letter (entropy ≈ ln K nats;
ln 4 = 1.39 > τ = 0.8), while the copy and the end-of-turn token are deterministic (entropy ≈ 0, below τ).

- `build_task`: the prompts, their valid sets and the K valid completions of each as `TeacherReferences`;
- `train_teacher`: a tiny Llama trained in-process on uniformly drawn valid completions;
- `sft_on_greedy`: a smaller student fine-tuned on the teacher's greedy completion of each prompt (sequence-level
  KD: one answer per prompt), so its rollouts have the right format but cover about one answer of K;
- `evaluate`: the per-position quantities at the multi-modal position and the sampled coverage of valid answers.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trl_sdx.entropy_gkd.evaluation import TeacherReferences, teacher_references

ANSWER_LETTERS = "abcdefghijklmnop"
_KEY_LETTERS = "BCDFGJKLMNPRSVWXYZ"


@dataclass
class SynthTask:
    prompts: list[str]
    prompt_ids: torch.Tensor  # [P, L], all prompts the same length
    valid: list[list[int]]  # per prompt, the K valid answer token ids
    refs: TeacherReferences  # the P·K valid completions (prompt repeated K times)
    eos_id: int

    @property
    def num_valid(self) -> int:
        return len(self.valid[0])


def build_task(tokenizer, num_prompts: int, num_valid: int) -> SynthTask:
    keys = [a + b for a, b in itertools.product(_KEY_LETTERS, _KEY_LETTERS)][:num_prompts]
    if len(keys) < num_prompts:
        raise ValueError(f"at most {len(_KEY_LETTERS) ** 2} prompts, got num_prompts = {num_prompts}.")
    prompts = [f"#{key}=" for key in keys]
    ids = [tokenizer(text=p)["input_ids"] for p in prompts]
    if len({len(x) for x in ids}) != 1:
        raise ValueError("the synthetic prompts must all tokenise to the same length (no padding).")
    letters = [tokenizer.convert_tokens_to_ids(c) for c in ANSWER_LETTERS]
    if num_valid > len(letters):
        raise ValueError(f"num_valid must be <= {len(letters)}, got {num_valid}.")
    valid = [random.Random(f"eopd-modes-{key}").sample(letters, num_valid) for key in keys]
    eos = tokenizer.eos_token_id
    prompt_ids = torch.tensor(ids)
    rows = [(i, m) for i in range(num_prompts) for m in valid[i]]
    refs = TeacherReferences(
        prompt_ids=prompt_ids[[i for i, _ in rows]],
        prompt_mask=torch.ones(len(rows), prompt_ids.size(1), dtype=torch.long),
        completion_ids=torch.tensor([[m, m, eos] for _, m in rows]),
        completion_mask=torch.ones(len(rows), 3, dtype=torch.long),
    )
    return SynthTask(prompts, prompt_ids, valid, refs, eos)


def _sft(model, prompt_ids: torch.Tensor, draw_completions, steps: int, lr: float, batch_size: int,
         generator: torch.Generator) -> list[float]:
    """Adam on the completion tokens' NLL; `draw_completions(rows)` gives a [B, C] completion per drawn prompt."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    width = prompt_ids.size(1)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, prompt_ids.size(0), (batch_size,), generator=generator)
        completion = draw_completions(rows)
        input_ids = torch.cat([prompt_ids[rows], completion], 1)
        logits = model(input_ids=input_ids).logits[:, width - 1 : -1]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), completion.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_teacher(model, task: SynthTask, steps: int, lr: float = 3e-3, batch_size: int = 64, seed: int = 0):
    """Train on valid completions drawn uniformly: the teacher learns ≈ 1/K on each valid letter."""
    generator = torch.Generator().manual_seed(seed)
    valid = torch.tensor(task.valid)

    def draw(rows):
        pick = torch.randint(0, task.num_valid, (rows.numel(),), generator=generator)
        m = valid[rows, pick]
        return torch.stack([m, m, torch.full_like(m, task.eos_id)], 1)

    return _sft(model, task.prompt_ids, draw, steps, lr, batch_size, generator)


def sft_on_greedy(student, teacher, tokenizer, task: SynthTask, steps: int, lr: float, batch_size: int,
                  seed: int) -> list[float]:
    """Fine-tune the student on the teacher's greedy completion of each prompt (one answer per prompt)."""
    greedy = teacher_references(teacher, tokenizer, task.prompts, max_new_tokens=3)
    generator = torch.Generator().manual_seed(seed)
    return _sft(student, task.prompt_ids, lambda rows: greedy.completion_ids[rows], steps, lr, batch_size, generator)


@torch.no_grad()
def position_stats(model, teacher, refs: TeacherReferences, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per completion position of `refs` ([N, C] each): teacher entropy, student entropy and KL(π_T ‖ π_θ) over the
    full vocabulary; plus both models' probabilities at completion position 0 ([N, V]). Position t is scored from
    the logit that predicts completion token t, with the same context for both models."""
    width = refs.completion_ids.size(1)
    parts = []
    for start in range(0, refs.completion_ids.size(0), batch_size):
        rows = slice(start, start + batch_size)
        input_ids = torch.cat([refs.prompt_ids[rows], refs.completion_ids[rows]], 1)
        attention = torch.cat([refs.prompt_mask[rows], refs.completion_mask[rows]], 1)
        teacher_logp, student_logp = (
            F.log_softmax(m(input_ids=input_ids, attention_mask=attention).logits[:, -width - 1 : -1].float(), -1)
            for m in (teacher, model))
        parts.append({
            "teacher_entropy": -(teacher_logp.exp() * teacher_logp).sum(-1),
            "student_entropy": -(student_logp.exp() * student_logp).sum(-1),
            "kl": (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1),
            "teacher_probs_first": teacher_logp[:, 0].exp(),
            "student_probs_first": student_logp[:, 0].exp(),
        })
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


@torch.no_grad()
def sampled_coverage(model, task: SynthTask, num_samples: int, seed: int) -> dict[str, float]:
    """k samples per prompt at T = 1 (no top-k/top-p): coverage@k = distinct valid completions found / K.

    A completion is valid when it is exactly `m m <|im_end|>` with m in the prompt's valid set.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=task.prompt_ids, attention_mask=torch.ones_like(task.prompt_ids),
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=3,
                             num_return_sequences=num_samples, pad_token_id=task.eos_id, eos_token_id=task.eos_id)
    completions = out[:, task.prompt_ids.size(1):].tolist()
    coverage = valid_share = pass_at_k = 0.0
    for i, valid in enumerate(task.valid):
        found = set()
        rows = completions[i * num_samples : (i + 1) * num_samples]
        for c in rows:
            if len(c) == 3 and c[0] in valid and c[1] == c[0] and c[2] == task.eos_id:
                found.add(c[0])
                valid_share += 1
        coverage += len(found) / len(valid)
        pass_at_k += float(bool(found))
    n = len(task.valid)
    return {"coverage_at_k": coverage / n, "valid_share": valid_share / (n * num_samples), "pass_at_k": pass_at_k / n}


def evaluate(model, teacher, task: SynthTask, num_samples: int, seed: int) -> dict[str, float]:
    """The curve row of one evaluation: multi-modal-position KL, entropies and valid mass; overall KL; coverage."""
    was_training = model.training
    model.eval()
    stats = position_stats(model, teacher, task.refs)
    # Each prompt appears K times in refs with the same position-0 context: read position 0 once per prompt.
    first = torch.arange(0, task.refs.completion_ids.size(0), task.num_valid)
    valid = torch.tensor(task.valid)
    student_p0 = stats["student_probs_first"][first]
    row = {
        "kl_modal": stats["kl"][first, 0].mean().item(),
        "student_entropy_modal": stats["student_entropy"][first, 0].mean().item(),
        "teacher_entropy_modal": stats["teacher_entropy"][first, 0].mean().item(),
        "student_valid_mass_modal": student_p0.gather(1, valid).sum(1).mean().item(),
        "kl_all_positions": stats["kl"].mean().item(),
        "kl_deterministic": stats["kl"][:, 1:].mean().item(),
        # Expected distinct valid letters among k first tokens, / K, exact from π_θ(·|prompt): coverage of the
        # multi-modal position alone, whatever the copy and end-of-turn steps do.
        "coverage_first_token_at_k": (1 - (1 - student_p0.gather(1, valid)) ** num_samples).mean().item(),
        **sampled_coverage(model, task, num_samples, seed),
    }
    model.train(was_training)
    return row


def teacher_check(teacher, task: SynthTask, tau: float, num_samples: int, seed: int) -> dict:
    """Is the effect within reach? The teacher's entropy at the multi-modal positions must exceed τ (and be ≈ 0
    elsewhere), with its mass on the valid answers; reported before any distillation run."""
    stats = position_stats(teacher, teacher, task.refs)
    first = torch.arange(0, task.refs.completion_ids.size(0), task.num_valid)
    entropy0 = stats["teacher_entropy"][first, 0]
    p0 = stats["teacher_probs_first"][first]
    mass = p0.gather(1, torch.tensor(task.valid)).sum(1)
    return {
        "tau": tau,
        "ln_K": math.log(task.num_valid),
        "entropy_modal_mean": entropy0.mean().item(),
        "entropy_modal_min": entropy0.min().item(),
        "share_modal_above_tau": (entropy0 > tau).float().mean().item(),
        "entropy_deterministic_max": stats["teacher_entropy"][:, 1:].max().item(),
        "valid_mass_modal_mean": mass.mean().item(),
        "valid_mass_modal_min": mass.min().item(),
        **{f"teacher_{k}": v for k, v in sampled_coverage(teacher, task, num_samples, seed).items()},
    }
