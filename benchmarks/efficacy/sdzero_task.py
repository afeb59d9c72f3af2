"""The synthetic task of the SD-Zero efficacy benchmark: two-digit addition whose carry the base model is unsure of.

Problem x: "What is a + b? Put the answer in \\boxed{}." with a, b in 10..99; the reference answer is a + b. On a
*carry* problem (the units add up to 10 or more) the one specific wrong answer is a + b − 10, the forgotten carry.

The base model is a tiny Llama pre-trained in-process (tiny_world.py) on two kinds of conversation about the
pre-training problems only (never the training, validation or test problems of the benchmark):

(a) answers: "\\boxed{a + b}" on a problem without a carry; on a carry problem the right answer with probability
    `p_carry_right` and the forgotten carry otherwise (per sample, so the model learns to be unsure between exactly
    those two answers). Its accuracy is therefore ≈ share_no_carry + share_carry · p_carry_right, 20–80% by design.
(b) self-revisions, in the layout SD-Zero's reviser reads (the continuation of the assistant turn): an answer y drawn
    as in (a) or (a share `other_error_share`) another wrong answer (±1, ±2, ±9, ±10, ±11 off), then
    "\\n\\n" + P_r + "\\n\\n" with P_r chosen by whether y is right, then "\\boxed{a + b}". Everything
    after the first "\\n" is trained on, y and that "\\n" are not (`PREFIXED_CHATML_TEMPLATE`): the base model
    learns to write the phrases, which phrase fits its answer, and what "this response is wrong" means (the other
    of its two candidates), but not to go on after its own answer instead of ending the turn. (A base that could
    not write the phrases would meet them first in SRT's stage 1, whose loss then starts at ~9 nats per phrase
    token and wrecks the model; the paper's instruct models write such text already.)

So the base reviser, told that its answer is wrong, can exclude it, and what is left is the right answer: the
information SD-Zero turns into dense supervision. Whether it does is measured first (`reviser_accuracy`).

Digits are single tokens: the tokenizer is learnt from the corpus with the digits spaced out, so BPE learns no digit
merges, and the task text (digits unspaced) then encodes one token per digit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from trl_sdx.rewards import boxed_answer_reward
from trl_sdx.sdzero.control_phrases import CORRECT_PHRASE, INCORRECT_PHRASE
from trl_sdx.sdzero.srt_collect import revision_prompt_text
from trl_sdx.sdzero.teacher_inputs import control_text
from trl_sdx.testing import CHATML_TEMPLATE

# ChatML where an assistant message may carry an untrained `prefix` rendered before its trained content (outside the
# `{% generation %}` span). Without a prefix it renders exactly as `CHATML_TEMPLATE`.
PREFIXED_CHATML_TEMPLATE = CHATML_TEMPLATE.replace(
    "{% generation %}{{ message['content']",
    "{% if message.get('prefix') %}{{ message['prefix'] }}{% endif %}{% generation %}{{ message['content']",
)
assert PREFIXED_CHATML_TEMPLATE != CHATML_TEMPLATE  # the replaced span must exist

POOLS = ("test", "validation", "train", "pretrain")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def carry(self) -> bool:
        return self.a % 10 + self.b % 10 >= 10

    @property
    def forgotten_carry(self) -> int:
        return self.a + self.b - 10

    @property
    def prompt(self) -> list[dict]:
        return [{"role": "user", "content": f"What is {self.a} + {self.b}? Put the answer in \\boxed{{}}."}]


def boxed(value: int) -> str:
    return f"\\boxed{{{value}}}"


def split_problems(sizes: dict[str, int], carry_share: float, operands: tuple[int, int] = (10, 99), seed: int = 0
                   ) -> dict[str, list[Problem]]:
    """Disjoint pools of the problems with a, b in `operands` (inclusive): `sizes` per pool of POOLS, each with
    `carry_share` carry problems; "pretrain" takes the rest. The split depends on `seed` only (the task, not the
    run)."""
    rng = random.Random(f"sdzero-task-{seed}")
    low, high = operands
    everything = [Problem(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    rng.shuffle(everything)
    carry = [p for p in everything if p.carry]
    plain = [p for p in everything if not p.carry]
    pools = {}
    for pool in POOLS[:-1]:
        n_carry = round(sizes[pool] * carry_share)
        if n_carry > len(carry) or sizes[pool] - n_carry > len(plain):
            raise ValueError(f"not enough problems for pool {pool!r} ({sizes[pool]}).")
        pools[pool] = carry[:n_carry] + plain[: sizes[pool] - n_carry]
        carry, plain = carry[n_carry:], plain[sizes[pool] - n_carry:]
        rng.shuffle(pools[pool])
    pools["pretrain"] = carry + plain
    rng.shuffle(pools["pretrain"])
    return pools


def base_answer(problem: Problem, rng: random.Random, p_carry_right: float) -> int:
    if problem.carry and rng.random() >= p_carry_right:
        return problem.forgotten_carry
    return problem.answer


# Other wrong answers a self-revision starts from (y = a + b + offset), besides the model's own forgotten carry.
OTHER_ERRORS = (-11, -9, -2, -1, 1, 2, 9, 10, 11)


def pretraining_chats(problems: list[Problem], num_chats: int, revision_share: float, p_carry_right: float,
                      seed: int, other_error_share: float = 0.0, correct_phrase: str = CORRECT_PHRASE,
                      incorrect_phrase: str = INCORRECT_PHRASE) -> list[list[dict]]:
    """`num_chats` conversations (a) answers and (b) self-revisions; see the module docstring. A share
    `other_error_share` of the revisions starts from another wrong answer (`OTHER_ERRORS`), so that "wrong" means
    "not this answer" rather than "add the carry"."""
    rng = random.Random(f"sdzero-pretrain-{seed}")
    chats = []
    for _ in range(num_chats):
        problem = rng.choice(problems)
        y = base_answer(problem, rng, p_carry_right)
        if rng.random() < revision_share:
            if rng.random() < other_error_share:
                y = problem.answer + rng.choice(OTHER_ERRORS)
            phrase = correct_phrase if y == problem.answer else incorrect_phrase
            text = boxed(y) + control_text(phrase) + boxed(problem.answer)
            cut = len(boxed(y)) + 1  # y and the first "\n" untrained: ending the turn after y stays the habit
            reply = {"role": "assistant", "prefix": text[:cut], "content": text[cut:]}
        else:
            reply = {"role": "assistant", "content": boxed(y)}
        chats.append([*problem.prompt, reply])
    return chats


def tokenizer_corpus(problems: list[Problem], correct_phrase: str = CORRECT_PHRASE,
                     incorrect_phrase: str = INCORRECT_PHRASE) -> list[str]:
    """Texts to learn the BPE merges from: the prompts and replies with every digit spaced out (no digit merges)."""
    space = lambda text: " ".join(text) if text.isdigit() else text  # noqa: E731
    texts = []
    for problem in problems[:2000]:
        prompt = problem.prompt[0]["content"].replace(str(problem.a), space(str(problem.a)))
        prompt = prompt.replace(str(problem.b), space(str(problem.b)))
        texts += [prompt, f"\\boxed{{{space(str(problem.answer))}}}"]
    # The phrases without their "\n\n": a text ending in "\n\n" would teach BPE a merged "\n\n" token that
    # a text-level revision prompt (ending in "\n\n") gets and a rendered one ("\n\n\\boxed") does not.
    return texts + [correct_phrase, incorrect_phrase, "<|im_start|>user\n", "<|im_start|>assistant\n"]


# --------------------------------------------------------------------------------------------------------------------
# Evaluation: greedy and sampled accuracy, and the reviser's accuracy on the model's own answers
# --------------------------------------------------------------------------------------------------------------------
def prompt_text(tokenizer, problem: Problem) -> str:
    return tokenizer.apply_chat_template(problem.prompt, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], *, n: int, greedy: bool, max_new_tokens: int, seed: int,
             temperature: float = 1.0, batch_size: int = 512) -> list[list[str]]:
    """n continuations of each text (greedy: n = 1), up to the end-of-turn token, special tokens removed. The
    sampling seed is fixed per call and the global RNG is left as it was, so evaluations do not perturb training."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    flat = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts for _ in range(n)]
    out_texts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(flat), batch_size):
            chunk = flat[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=1.0,
                                                                   top_k=0)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=eos, **sampling)
            for row in out[:, width:].tolist():
                row = row[: row.index(eos)] if eos in row else row
                out_texts.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return [out_texts[i * n:(i + 1) * n] for i in range(len(texts))]


def grade(completions: list[str], answers: list[int]) -> list[float]:
    """The strict boxed check of Phase 1 (`trl_sdx.rewards.boxed_answer_reward`): the last box; no box is wrong."""
    return boxed_answer_reward(completions, [str(a) for a in answers])


def accuracy(model, tokenizer, problems: list[Problem], *, k: int, max_new_tokens: int, seed: int) -> dict:
    """Greedy accuracy, avg@k at T = 1 (mean correctness over k samples per problem), and two diagnostics of the
    samples: the share with a box, and the share with more than one box (an answer revised inside the turn)."""
    texts = [prompt_text(tokenizer, p) for p in problems]
    answers = [p.answer for p in problems]
    greedy = [ys[0] for ys in generate(model, tokenizer, texts, n=1, greedy=True, max_new_tokens=max_new_tokens,
                                       seed=seed)]
    sampled = generate(model, tokenizer, texts, n=k, greedy=False, max_new_tokens=max_new_tokens, seed=seed)
    flat = [y for ys in sampled for y in ys]
    flat_answers = [a for a in answers for _ in range(k)]
    right = grade(flat, flat_answers)
    carry = [p.carry for p in problems for _ in range(k)]
    on_carry = [r for r, c in zip(right, carry) if c]
    return {
        "greedy": sum(grade(greedy, answers)) / len(problems),
        "avg_at_k": sum(right) / len(right),
        "avg_at_k_carry": sum(on_carry) / max(1, len(on_carry)),
        "boxed_share": sum("\\boxed{" in y for y in flat) / len(flat),
        "inline_revision_share": sum(y.count("\\boxed{") > 1 for y in flat) / len(flat),
    }


def reviser_accuracy(model, tokenizer, problems: list[Problem], *, k: int, max_new_tokens: int, seed: int,
                     correct_phrase: str = CORRECT_PHRASE, incorrect_phrase: str = INCORRECT_PHRASE) -> dict:
    """The check that comes first: sample k answers y per problem (T = 1), grade them, and sample one revision of each
    as Phase 1 does (`revision_prompt_text`: the assistant turn continues after y + "\\n\\n" + P_r + "\\n\\n").
    Returns the share of correct revisions after a wrong y (P_0) and after a right y (P_1)."""
    texts = [prompt_text(tokenizer, p) for p in problems]
    ys = generate(model, tokenizer, texts, n=k, greedy=False, max_new_tokens=max_new_tokens, seed=seed)
    rows = [(text, p, y) for text, p, samples in zip(texts, problems, ys) for y in samples]
    rewards = grade([y for _, _, y in rows], [p.answer for _, p, _ in rows])
    revision_texts = [revision_prompt_text(text, y, correct_phrase if r else incorrect_phrase)
                      for (text, _, y), r in zip(rows, rewards)]
    revised = [r[0] for r in generate(model, tokenizer, revision_texts, n=1, greedy=False,
                                      max_new_tokens=max_new_tokens, seed=seed + 1)]
    revised_right = grade(revised, [p.answer for _, p, _ in rows])
    after_wrong = [v for v, r in zip(revised_right, rewards) if not r]
    after_right = [v for v, r in zip(revised_right, rewards) if r]
    return {
        "samples": len(rows),
        "wrong_samples": len(after_wrong),
        "revision_right_after_wrong": sum(after_wrong) / len(after_wrong) if after_wrong else float("nan"),
        "revision_right_after_right": sum(after_right) / len(after_right) if after_right else float("nan"),
    }
