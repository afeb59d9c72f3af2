"""The two MixSD prompts: the naive x⁻ (question alone) and the expert x⁺ (question with the gold answer)."""

from __future__ import annotations

from collections.abc import Sequence

# Official "KGFact" strings (synthetic fact QA).
FACT_PREFIX = "\nThis question is from a new knowledge base. Here is the answer to this question:\n"
FACT_TRANSITION = "\nNow answer the question within \\boxed{}"
# Official "KGFunc"/SimpleQA strings (reasoning tasks with a reference solution).
REASONING_PREFIX = "\nHere is a reference solution to this problem, including the correct final answer:\n"
REASONING_TRANSITION = (
    "\nAfter understanding the reference solution, please attempt to answer the question again:\n"
    "Please reason step by step, and put your final answer within \\boxed{}"
)

PROMPT_TEMPLATES: dict[str, tuple[str, str]] = {
    "fact": (FACT_PREFIX, FACT_TRANSITION),
    "reasoning": (REASONING_PREFIX, REASONING_TRANSITION),
}


def resolve_template(name: str, prefix: str | None = None, transition: str | None = None) -> tuple[str, str]:
    """(PREFIX, TRANSITION) of a named template; explicit `prefix`/`transition` strings override it."""
    if name not in PROMPT_TEMPLATES and name != "custom":
        raise ValueError(
            f"`prompt_template` must be one of {[*PROMPT_TEMPLATES, 'custom']}, got {name!r}. Use 'custom' together "
            "with `expert_prefix` and `expert_transition` for your own strings."
        )
    if name == "custom" and (prefix is None or transition is None):
        raise ValueError("`prompt_template='custom'` needs both `expert_prefix` and `expert_transition`.")
    default_prefix, default_transition = PROMPT_TEMPLATES.get(name, ("", ""))
    return (default_prefix if prefix is None else prefix, default_transition if transition is None else transition)


def expert_user_message(question: str, gold_answer: str, prefix: str, transition: str) -> str:
    """x⁺'s user turn: question + PREFIX + "\\n" + y*.strip() + TRANSITION (the paper's expert context)."""
    return f"{question}{prefix}\n{gold_answer.strip()}{transition}"


# End-of-turn tokens the official generator stops on besides the tokenizer's EOS (ChatML, Llama 3, GPT-style).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end a target: the tokenizer's EOS, every `END_OF_TURN_TOKENS` entry it has, the model's EOS ids.

    Chat models often end a turn with a token that is not their EOS (Qwen3: EOS `<|endoftext|>`, turn end
    `<|im_end|>`; Llama 3: `<|eot_id|>`); stopping on all of them is what the official generator does.
    """
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab)
    if model is not None:
        from .mixed_decoding import _eos_ids

        ids |= _eos_ids(model, None)
    return sorted(ids)


def chat_prompt_ids(tokenizer, user_text: str, chat_template_kwargs: dict | None = None) -> list[int]:
    """chat(user=user_text) with the generation prompt, as token ids (what the model continues from).

    `chat_template_kwargs` (e.g. `{"enable_thinking": False}` for Qwen3) go to `apply_chat_template`; templates
    that do not use a keyword ignore it.
    """
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True, return_dict=False,
        **(chat_template_kwargs or {}),
    )
    return list(ids)


def build_prompt_ids(
    tokenizer, questions: Sequence[str], gold_answers: Sequence[str], prefix: str, transition: str,
    chat_template_kwargs: dict | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of x⁻ and x⁺ for every (question, gold answer), rendered with the same template arguments."""
    naive = [chat_prompt_ids(tokenizer, q, chat_template_kwargs) for q in questions]
    expert = [
        chat_prompt_ids(tokenizer, expert_user_message(q, a, prefix, transition), chat_template_kwargs)
        for q, a in zip(questions, gold_answers, strict=True)
    ]
    return naive, expert
