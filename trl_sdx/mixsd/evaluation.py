"""The paper's knowledge-injection metrics.

- memorisation: accuracy on the injected questions (greedy answer graded against the gold answer);
- retention: accuracy on held-out probe questions, relative to the base model's (1.0 = nothing forgotten);
- target NLL: the base model's per-token NLL of training targets and the share of tokens with NLL > 5 (SFT's gold
  answers are far from the model's distribution, MixSD targets should not be).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from tqdm.auto import tqdm

from .mixed_decoding import mixed_generate
from .prompts import chat_prompt_ids, stop_token_ids
from .rejection import AnswerChecker


def lenient_answer_checker(answer: str, gold: str) -> bool:
    """Evaluation grading: the final answer matches the gold one, or the gold value appears in the answer as a word.

    The gold value is the gold turn's final answer (its \\boxed{} content, else last number, else the whole turn).
    The fallback matters for models that state a fact without boxing it ("Paris is the capital of France."), which
    is how a base model answers probe questions; it is applied alike to every model compared.
    """
    from trl_sdx.rewards import answers_match, extract_final_answer

    value = (extract_final_answer(gold) or gold).strip()
    if answers_match(extract_final_answer(answer), value):
        return True
    if not value:
        return False
    return re.search(rf"(?<![\w]){re.escape(value)}(?![\w])", answer, flags=re.IGNORECASE) is not None


def greedy_answers(
    model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16,
    chat_template_kwargs: dict | None = None, disable_progress: bool = True, desc: str = "MixSD evaluation",
) -> list[str]:
    """Greedy answers to chat(user=question), rendered with `chat_template_kwargs`, decoded without special tokens.

    Uses `mixed_generate` with λ = 1 (naive conditional only), which is plain greedy decoding with a KV cache; it
    stops on the same EOS / end-of-turn tokens as target generation. `greedy_answers_with_cut_off` also says which
    answers `max_new_tokens` cut off.
    """
    return greedy_answers_with_cut_off(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, chat_template_kwargs=chat_template_kwargs,
                                       disable_progress=disable_progress, desc=desc)[0]


def greedy_answers_with_cut_off(
    model, tokenizer, questions: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16,
    chat_template_kwargs: dict | None = None, disable_progress: bool = True, desc: str = "MixSD evaluation",
) -> tuple[list[str], list[bool]]:
    """`greedy_answers` and, per answer, whether it was cut off (no EOS / end-of-turn within `max_new_tokens`)."""
    prompts = [chat_prompt_ids(tokenizer, q, chat_template_kwargs) for q in questions]
    stop = stop_token_ids(tokenizer, model)
    texts, cut_off = [], []
    with tqdm(total=len(prompts), desc=desc, unit="question", disable=disable_progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            outputs = mixed_generate(model, chunk, chunk, lambda_mix=1.0, temperature=0.0,
                                     max_new_tokens=max_new_tokens, eos_token_id=stop)
            texts.extend(tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs)
            cut_off.extend(not ids or ids[-1] not in stop for ids in outputs)
            bar.update(len(chunk))
    return texts, cut_off


def answer_accuracy(
    model, tokenizer, questions: Sequence[str], gold_answers: Sequence[str], *,
    answer_checker: AnswerChecker | None = None, max_new_tokens: int = 64, batch_size: int = 16,
    chat_template_kwargs: dict | None = None, disable_progress: bool = True, desc: str = "MixSD evaluation",
) -> dict:
    """Share of questions whose greedy answer passes `answer_checker(answer_text, gold_answer_text)`.

    The default checker is `lenient_answer_checker`. `num_cut_off` counts the answers `max_new_tokens` cut off (graded
    as they are: raise `max_new_tokens` when it is not 0).
    """
    checker = answer_checker or lenient_answer_checker
    answers, cut_off = greedy_answers_with_cut_off(
        model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
        chat_template_kwargs=chat_template_kwargs, disable_progress=disable_progress, desc=desc)
    correct = [bool(checker(a, g)) for a, g in zip(answers, gold_answers, strict=True)]
    return {"accuracy": sum(correct) / len(correct) if correct else 0.0, "correct": correct, "answers": answers,
            "cut_off": cut_off, "num_cut_off": sum(cut_off)}


def evaluate_knowledge_injection(
    model, tokenizer, injected, probe, *, base_probe_accuracy: float | None = None,
    question_column: str = "question", answer_column: str = "answer",
    answer_checker: AnswerChecker | None = None, max_new_tokens: int = 64, batch_size: int = 16,
    chat_template_kwargs: dict | None = None, disable_progress: bool = True,
) -> dict:
    """Memorisation on `injected` and retention on `probe` (datasets with question/answer columns).

    `retention` = probe accuracy / `base_probe_accuracy` when the base model's probe accuracy is given (evaluate
    the base model with this same function first). The greedy answers are returned too (`answers`, `probe_answers`)
    for a report file; `disable_progress=False` shows a progress bar.
    """
    kwargs = dict(answer_checker=answer_checker, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  chat_template_kwargs=chat_template_kwargs, disable_progress=disable_progress)
    memorisation = answer_accuracy(model, tokenizer, injected[question_column], injected[answer_column],
                                   desc="MixSD eval: injected facts", **kwargs)
    retained = answer_accuracy(model, tokenizer, probe[question_column], probe[answer_column],
                               desc="MixSD eval: probe questions", **kwargs)
    result = {
        "memorisation": memorisation["accuracy"],
        "probe_accuracy": retained["accuracy"],
        "num_injected": len(memorisation["correct"]),
        "num_probe": len(retained["correct"]),
        "answers": memorisation["answers"],
        "correct": memorisation["correct"],
        "probe_answers": retained["answers"],
        "probe_correct": retained["correct"],
    }
    if base_probe_accuracy is not None:
        result["base_probe_accuracy"] = base_probe_accuracy
        # Undefined (None, valid JSON) when the base model answers no probe question.
        result["retention"] = retained["accuracy"] / base_probe_accuracy if base_probe_accuracy > 0 else None
    return result


def _completion_token_ids(tokenizer, question: str, completion: str,
                          chat_template_kwargs: dict | None = None) -> tuple[list[int], int]:
    """Ids of chat(user=question, assistant=completion) and where the completion starts (as SFTTrainer splits it)."""
    prompt = chat_prompt_ids(tokenizer, question, chat_template_kwargs)
    full = list(tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": completion}],
        tokenize=True, return_dict=False, **(chat_template_kwargs or {}),
    ))
    start = 0
    while start < min(len(prompt), len(full)) and prompt[start] == full[start]:
        start += 1
    return full, start


@torch.no_grad()
def target_nll_stats(
    model, tokenizer, questions: Sequence[str], completions: Sequence[str], *,
    threshold: float = 5.0, batch_size: int = 8, chat_template_kwargs: dict | None = None,
) -> dict:
    """The model's NLL of each completion token given chat(user=question) (the tokens SFT trains on).

    Returns the mean per-token NLL, the share of tokens with NLL > `threshold` (paper: 5) and the token count.
    """
    device = model.get_input_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nlls: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        pairs = [_completion_token_ids(tokenizer, q, c, chat_template_kwargs)
                 for q, c in zip(questions, completions, strict=True)]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for row, (ids, completion_start) in enumerate(chunk):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
                loss_mask[row, completion_start:len(ids)] = True
            input_ids, attention_mask, loss_mask = input_ids.to(device), attention_mask.to(device), loss_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
            token_nll = -torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            nlls.append(token_nll[loss_mask[:, 1:]].cpu())
    finally:
        model.train(was_training)
    all_nll = torch.cat(nlls) if nlls else torch.empty(0)
    count = all_nll.numel()
    return {
        "mean_nll": all_nll.mean().item() if count else float("nan"),
        "high_nll_share": (all_nll > threshold).float().mean().item() if count else float("nan"),
        "num_tokens": count,
        "threshold": threshold,
    }
