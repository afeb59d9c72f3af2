"""SD-Zero Phase 1, collection of D_rev (spec, "Phase 1", steps 1-3), on one or several processes.

For each problem x: sample y_init ~ pi(.|x) on the collection prompt, grade it (r), and for the y_init to revise
(incorrect ones; correct ones too with `revise_correct`) sample y_revised as the continuation of the assistant turn
`chat(x, add_generation_prompt) + y_init + "\\n\\n" + P_r + "\\n\\n"`. Tuples whose y_revised is verified correct
form D_rev.

Problems are processed in steps of `collection_batch_size`. Step c is seeded with (seed, c) and goes to process
c mod P, so every problem is sampled exactly once, on one process, and the result does not depend on how many
processes there are. After each round the processes add up their kept revisions and stop together once
`max_revisions` is reached; the records are gathered on every process in problem order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from tqdm.auto import tqdm
from trl.data_utils import is_conversational

from trl_sdx.sdzero.rewards import binary_reward, score_completions
from trl_sdx.sdzero.srt_config import SRTConfig
from trl_sdx.sdzero.teacher_inputs import control_text
from trl_sdx.vllm_engine import release_vllm_engine

D_REV_COLUMNS = ("y_init", "init_reward", "control_phrase", "y_revised")


def _cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string (vLLM drops the stop string; transformers' generate keeps it)."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(cuts)] if cuts else text


# --------------------------------------------------------------------------------------------------------------------
# Sampling backends: (prompt token ids, n, max_new_tokens, seed) -> n decoded continuations per prompt
# --------------------------------------------------------------------------------------------------------------------
class HFSampler:
    """Batched `model.generate` on this process's device (works on CPU).

    Stop strings are applied to the decoded text, as vLLM applies them: generation runs to the end-of-turn token or
    the budget and the text is cut at the first stop string. (transformers' own `stop_strings` criterion scans the
    whole vocabulary and slows CPU generation by orders of magnitude.)
    """

    def __init__(self, model, tokenizer, config: SRTConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, seed: int) -> list[list[str]]:
        torch.manual_seed(seed)
        flat = [ids for ids in prompt_ids for _ in range(n)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        texts: list[str] = []
        for start in range(0, len(flat), self.config.generate_batch_size):
            chunk = flat[start : start + self.config.generate_batch_size]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                temperature=self.config.sampling_temperature, top_p=self.config.sampling_top_p, top_k=0,
                max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
            )
            texts += [self._text(ids) for ids in out[:, width:].tolist()]
        self.model.train(was_training)
        return [texts[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def _text(self, ids: list[int]) -> str:
        """Decoded up to the end-of-turn token, cut at the first stop string, special tokens removed."""
        eos = self.tokenizer.eos_token_id
        ids = ids[: ids.index(eos)] if eos in ids else ids
        text = _cut_at_stop_strings(self.tokenizer.decode(ids, skip_special_tokens=False), self.config.stop_strings)
        for special in self.tokenizer.all_special_tokens:
            text = text.replace(special, "")
        return text

    def close(self) -> None:
        pass


class VLLMSampler:
    """`vllm.LLM` on a model path (optional; not exercised by the CPU test suite).

    Under a multi-process launch every process builds its engine with vLLM's `external_launcher` backend, as TRL's
    colocate mode does; processes in the same tensor-parallel group share one engine and sample the same problems.
    """

    def __init__(self, model_path: str, config: SRTConfig, num_processes: int):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ValueError("`use_vllm_collection=True` needs vLLM: `pip install vllm`.") from error
        if num_processes % config.vllm_tensor_parallel_size:
            raise ValueError(f"`vllm_tensor_parallel_size` ({config.vllm_tensor_parallel_size}) must divide the "
                             f"number of processes ({num_processes}).")
        self.config = config
        distributed = {"distributed_executor_backend": "external_launcher"} if num_processes > 1 else {}
        self.llm = LLM(model=model_path, seed=config.seed, max_model_len=config.vllm_max_model_len,
                       gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                       tensor_parallel_size=config.vllm_tensor_parallel_size, **distributed)

    def __call__(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int, seed: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=self.config.sampling_temperature, top_p=self.config.sampling_top_p,
                                max_tokens=max_new_tokens, stop=list(self.config.stop_strings) or None, seed=seed,
                                skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [[choice.text for choice in out.outputs] for out in outputs]

    def close(self) -> None:
        """Free the engine and its GPU memory (KV cache included) before SFT needs it."""
        release_vllm_engine(self)


# --------------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------------
def collection_prompt_text(tokenizer, prompt, config: SRTConfig) -> str:
    """chat(x, add_generation_prompt=True) of the collection prompt: the system turn (if x has none) and the suffix
    on the last user turn. A plain-text prompt gets the suffix only and no chat template."""
    if not is_conversational({"prompt": prompt}):
        return prompt + config.collection_prompt_suffix
    messages = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if users:
        messages[users[-1]]["content"] += config.collection_prompt_suffix
    if config.collection_system_prompt is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": config.collection_system_prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def revision_prompt_text(prompt_text: str, y_init: str, phrase: str) -> str:
    """The revision prompt: the assistant turn continues after y_init + "\\n\\n" + P_r + "\\n\\n"."""
    return prompt_text + y_init + control_text(phrase)


# --------------------------------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------------------------------
def _grade(reward_funcs, weights, threshold, rows: list[dict], responses: list[str], conversational: bool) -> list[int]:
    if not rows:
        return []
    completions = [[{"role": "assistant", "content": r}] for r in responses] if conversational else responses
    scores = score_completions(reward_funcs, rows, [row["prompt"] for row in rows], completions, [[] for _ in rows])
    return binary_reward(scores, weights, threshold).tolist()


def _collect_step(sampler, tokenizer, rows: list[dict], indices: range, config: SRTConfig, reward_funcs, weights,
                  seed: int) -> tuple[list[tuple], Counter]:
    """One collection step on problems `indices`: ([(sort key, record)], counts)."""
    conversational = is_conversational({"prompt": rows[indices[0]]["prompt"]})
    texts = {i: collection_prompt_text(tokenizer, rows[i]["prompt"], config) for i in indices}
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    init = sampler([encode(texts[i]) for i in indices], config.num_init_samples, config.init_max_new_tokens, seed)
    attempts = [(i, j, y) for i, ys in zip(indices, init, strict=True) for j, y in enumerate(ys)]
    init_rewards = _grade(reward_funcs, weights, config.reward_threshold, [rows[i] for i, _, _ in attempts],
                          [y for _, _, y in attempts], conversational)
    phrases = {1: config.correct_phrase, 0: config.incorrect_phrase}
    to_revise = [(i, j, y, r) for (i, j, y), r in zip(attempts, init_rewards, strict=True)
                 if r == 0 or config.revise_correct]
    revisions = sampler([encode(revision_prompt_text(texts[i], y, phrases[r])) for i, _, y, r in to_revise],
                        config.num_revisions, config.revision_max_new_tokens, seed + 1) if to_revise else []
    candidates = [(i, j, k, y, r, y_rev) for (i, j, y, r), ys in zip(to_revise, revisions, strict=True)
                  for k, y_rev in enumerate(ys)]
    revised_rewards = _grade(reward_funcs, weights, config.reward_threshold, [rows[c[0]] for c in candidates],
                             [c[5] for c in candidates], conversational)
    kept = [c for c, ok in zip(candidates, revised_rewards, strict=True) if ok == 1]
    records = [((i, j, k), {**rows[i], "y_init": y, "init_reward": r, "control_phrase": phrases[r], "y_revised": y_rev})
               for i, j, k, y, r, y_rev in kept]
    counts = Counter(
        problems=len(indices),
        init_samples=len(attempts),
        init_correct=int(sum(init_rewards)),
        revision_attempts=len(candidates),
        revision_attempts_from_incorrect=sum(1 for c in candidates if c[4] == 0),
        revision_attempts_from_correct=sum(1 for c in candidates if c[4] == 1),
        revisions_correct=len(kept),
    )
    return records, counts


def collect_revisions(sampler, tokenizer, dataset: Dataset, config: SRTConfig, reward_funcs: Sequence[Callable],
                      reward_weights: torch.Tensor | None = None) -> tuple[Dataset, dict]:
    """D_rev (every dataset column, plus `y_init`, `init_reward`, `control_phrase`, `y_revised`) and the counts.

    Every process of the launch must call this; each samples its share of the problems, and all return the same
    gathered result.
    """
    state = PartialState()
    group = config.vllm_tensor_parallel_size if config.use_vllm_collection else 1
    shard, num_shards = state.process_index // group, state.num_processes // group
    weights = torch.ones(len(reward_funcs)) if reward_weights is None else reward_weights
    rows = [dict(row) for row in dataset]
    step_size = config.collection_batch_size
    steps = [range(s, min(s + step_size, len(rows))) for s in range(0, len(rows), step_size)]

    local: list[tuple] = []
    counts: Counter = Counter()
    total = Counter()
    bar = tqdm(total=len(rows), desc="SRT collection (problems)", unit="problem",
               disable=config.disable_tqdm or not state.is_main_process)
    for round_start in range(0, len(steps), num_shards):
        step = round_start + shard
        if step < len(steps):
            records, step_counts = _collect_step(sampler, tokenizer, rows, steps[step], config, reward_funcs,
                                                 weights, seed=config.seed * 1_000_003 + 2 * step)
            if state.process_index % group == 0:  # one copy per tensor-parallel group
                local += records
                counts += step_counts
        total = sum((Counter(c) for c in gather_object([dict(counts)])), Counter())
        bar.n = min(len(rows), total["problems"])
        bar.set_postfix(kept=total["revisions_correct"],
                        init_acc=f"{total['init_correct'] / max(1, total['init_samples']):.0%}",
                        rev_acc=f"{total['revisions_correct'] / max(1, total['revision_attempts']):.0%}")
        bar.refresh()
        if config.max_revisions is not None and total["revisions_correct"] >= config.max_revisions:
            break
    bar.close()

    gathered = sorted(gather_object(local), key=lambda item: item[0])
    kept = [record for _, record in gathered]
    limit = len(kept) if config.max_revisions is None else config.max_revisions
    summary = {key: int(total[key]) for key in ("problems", "init_samples", "init_correct", "revision_attempts",
                                                 "revision_attempts_from_incorrect", "revision_attempts_from_correct",
                                                 "revisions_correct")}
    summary.update(
        problems_in_dataset=len(rows),
        kept=min(limit, len(kept)),
        kept_from_incorrect=sum(1 for r in kept[:limit] if r["init_reward"] == 0),
        kept_from_correct=sum(1 for r in kept[:limit] if r["init_reward"] == 1),
        dropped_over_max_revisions=max(0, len(kept) - limit),
    )
    kept = kept[:limit]
    if state.is_main_process:
        print(f"SRT collection: {summary['problems']}/{len(rows)} problems, y_init correct "
              f"{summary['init_correct']}/{summary['init_samples']}, revisions kept {summary['kept']}/"
              f"{summary['revision_attempts']} ({summary['kept_from_incorrect']} after an incorrect y_init, "
              f"{summary['kept_from_correct']} after a correct one).")
    columns = list(rows[0]) + list(D_REV_COLUMNS)
    revisions = Dataset.from_list(kept) if kept else Dataset.from_dict({c: [] for c in columns})
    return revisions, summary
