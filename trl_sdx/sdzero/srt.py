"""SD-Zero Phase 1, Self-Revision Training (SRT): teach the model to revise its own answers, giving theta_SRT.

1. Collect D_rev: sample y_init ~ pi(.|x), grade it (r), append "\\n\\n" + P_r + "\\n\\n" to the assistant turn and
   sample y_revised as its continuation; keep the tuples whose y_revised is verified correct.
2. Build two SFT datasets (`build_srt_sft_datasets`) in TRL's conversational prompt/completion format:
   - "generation": prompt = x,                                      completion = y_init + delim + y_revised
   - "revision":   prompt = x + "\\n\\n" + y_init + "\\n\\n" + P_r (in the user turn), completion = y_revised
3. Run them with TRL's `SFTTrainer` (completion-only loss), the revision stage starting from the generation-stage
   weights.

Every part leaves its output and a marker under `output_dir`; rerunning `run_srt` skips what is finished.
"""

from __future__ import annotations

import copy
import gc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import create_model_from_path

from trl_sdx.models import resolve_model_name_or_path
from trl_sdx.sdzero.rewards import binary_reward, resolve_reward_funcs, score_completions
from trl_sdx.sdzero.sdzero_config import CORRECT_PHRASE, INCORRECT_PHRASE
from trl_sdx.sdzero.teacher_inputs import SEPARATOR, control_text
from trl_sdx.precision import resolve_device_defaults
from trl_sdx.validation import check_columns, check_tokenizer

SRT_STAGES = ("generation", "revision")
REVISIONS_DIR = "revisions"
STAGE_DIRS = {"generation": "stage1_generation", "revision": "stage2_revision"}
DONE_MARKER = "SRT_DONE.json"


@dataclass
class SRTConfig(SFTConfig):
    r"""
    Configuration of SD-Zero Phase 1 (`run_srt`, CLI `trl-sdx sdzero-srt`): revision collection, then SFT.

    The `SFTConfig` fields drive BOTH SFT stages (the paper: 3 epochs each, lr 5e-6, cosine schedule); `output_dir`
    is the root holding `revisions/`, `stage1_generation/` and `stage2_revision/` (theta_SRT).
    """

    learning_rate: float = field(default=5e-6, metadata={"help": "SFT learning rate of both stages (paper: 5e-6)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "SFT epochs of each stage (paper: 3)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "SFT schedule (paper: cosine)."})

    num_init_samples: int = field(
        default=1, metadata={"help": "y_init samples per problem x (each is graded and possibly revised)."}
    )
    num_revisions: int = field(
        default=1, metadata={"help": "y_revised samples per revised y_init; each verified-correct one is kept."}
    )
    revise_correct: bool = field(
        default=False,
        metadata={
            "help": "Also rephrase correct y_init (with P_1), as the paper does. Default False: the released code "
            "revises only incorrect y_init (with P_0)."
        },
    )
    correct_phrase: str = field(default=CORRECT_PHRASE, metadata={"help": "P_1, the control phrase after a correct y."})
    incorrect_phrase: str = field(
        default=INCORRECT_PHRASE, metadata={"help": "P_0, the control phrase after an incorrect y."}
    )
    reward_threshold: float = field(
        default=0.5, metadata={"help": "r = 1 when the weighted reward of a response is >= this value."}
    )
    init_max_new_tokens: int = field(default=512, metadata={"help": "Token budget of y_init."})
    revision_max_new_tokens: int = field(default=512, metadata={"help": "Token budget of y_revised."})
    sampling_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the collection."})
    sampling_top_p: float = field(default=1.0, metadata={"help": "Top-p of the collection."})
    collection_batch_size: int = field(
        default=16, metadata={"help": "Sequences per `generate` call during collection (transformers backend)."}
    )
    use_vllm_collection: bool = field(
        default=False,
        metadata={"help": "Sample the collection with vLLM (`vllm.LLM`, needs `pip install vllm` and a model path)."},
    )
    srt_stages: list[str] = field(
        default_factory=lambda: list(SRT_STAGES),
        metadata={
            "help": "SFT stages to run, in order: 'generation' and/or 'revision' (paper ablation: both 57.6, "
            "generation only 56.4, revision only 52.2)."
        },
    )

    def __post_init__(self):
        resolve_device_defaults(self)  # bf16 only where supported; current checkpointing name
        super().__post_init__()
        unknown = [s for s in self.srt_stages if s not in SRT_STAGES]
        if unknown or not self.srt_stages or len(set(self.srt_stages)) != len(self.srt_stages):
            raise ValueError(f"`srt_stages` must be a non-empty subset of {SRT_STAGES} without repeats, got "
                             f"{self.srt_stages}.")
        self.srt_stages = [s for s in SRT_STAGES if s in self.srt_stages]  # generation always before revision
        for name in ("num_init_samples", "num_revisions", "init_max_new_tokens", "revision_max_new_tokens",
                     "collection_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.correct_phrase == self.incorrect_phrase:
            raise ValueError("`correct_phrase` and `incorrect_phrase` must differ.")


# --------------------------------------------------------------------------------------------------------------------
# Sampling backends: (prompt token ids, n, max_new_tokens) -> n decoded continuations per prompt
# --------------------------------------------------------------------------------------------------------------------
class HFSampler:
    """Batched `model.generate` (works on CPU)."""

    def __init__(self, model, tokenizer, config: SRTConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int) -> list[list[str]]:
        flat = [ids for ids in prompt_ids for _ in range(n)]
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        texts: list[str] = []
        for start in range(0, len(flat), self.config.collection_batch_size):
            chunk = flat[start : start + self.config.collection_batch_size]
            width = max(map(len, chunk))
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                temperature=self.config.sampling_temperature, top_p=self.config.sampling_top_p, top_k=0,
                max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
            )
            texts += self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        self.model.train(was_training)
        return [texts[i * n : (i + 1) * n] for i in range(len(prompt_ids))]


class VLLMSampler:
    """`vllm.LLM` on a model path (optional; not exercised by the CPU test suite)."""

    def __init__(self, model_path: str, config: SRTConfig):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ValueError("`use_vllm_collection=True` needs vLLM: `pip install vllm`.") from error
        self.config = config
        self.llm = LLM(model=model_path, seed=config.seed)

    def __call__(self, prompt_ids: list[list[int]], n: int, max_new_tokens: int) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=self.config.sampling_temperature, top_p=self.config.sampling_top_p,
                                max_tokens=max_new_tokens, skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [[choice.text for choice in out.outputs] for out in outputs]

    def close(self) -> None:
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# (a) Collection of D_rev
# --------------------------------------------------------------------------------------------------------------------
def _prompt_text(tokenizer, prompt) -> str:
    """chat(x, add_generation_prompt=True) as text (a plain-text prompt is used as is)."""
    if is_conversational({"prompt": prompt}):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def _grade(reward_funcs, weights, threshold, rows: list[dict], responses: list[str], conversational: bool) -> list[int]:
    if not rows:
        return []
    completions = [[{"role": "assistant", "content": r}] for r in responses] if conversational else responses
    prompts = [row["prompt"] for row in rows]
    scores = score_completions(reward_funcs, rows, prompts, completions, [[] for _ in rows])
    return binary_reward(scores, weights, threshold).tolist()


def collect_revisions(sampler, tokenizer, dataset: Dataset, config: SRTConfig, reward_funcs: Sequence[Callable],
                      reward_weights: torch.Tensor | None = None) -> tuple[Dataset, dict]:
    """Sample y_init, grade it, sample y_revised after "\\n\\n" + P_r + "\\n\\n", keep verified-correct revisions.

    Returns D_rev (columns: every dataset column, plus `y_init`, `init_reward`, `control_phrase`, `y_revised`) and
    the counts of each stage.
    """
    weights = torch.ones(len(reward_funcs)) if reward_weights is None else reward_weights
    rows = [dict(row) for row in dataset]
    conversational = is_conversational({"prompt": rows[0]["prompt"]})
    prompt_texts = [_prompt_text(tokenizer, row["prompt"]) for row in rows]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]

    init_samples = sampler(prompt_ids, config.num_init_samples, config.init_max_new_tokens)
    attempts = [(i, y) for i, ys in enumerate(init_samples) for y in ys]
    init_rewards = _grade(reward_funcs, weights, config.reward_threshold, [rows[i] for i, _ in attempts],
                          [y for _, y in attempts], conversational)

    to_revise = [(i, y, r) for (i, y), r in zip(attempts, init_rewards, strict=True) if r == 0 or config.revise_correct]
    phrases = {1: config.correct_phrase, 0: config.incorrect_phrase}
    revision_ids = [
        tokenizer(prompt_texts[i] + y + control_text(phrases[r]), add_special_tokens=False)["input_ids"]
        for i, y, r in to_revise
    ]
    revisions = sampler(revision_ids, config.num_revisions, config.revision_max_new_tokens) if to_revise else []
    candidates = [(i, y, r, y_rev) for (i, y, r), ys in zip(to_revise, revisions, strict=True) for y_rev in ys]
    revised_rewards = _grade(reward_funcs, weights, config.reward_threshold, [rows[c[0]] for c in candidates],
                             [c[3] for c in candidates], conversational)

    kept = [c for c, ok in zip(candidates, revised_rewards, strict=True) if ok == 1]
    records = [
        {**rows[i], "y_init": y, "init_reward": r, "control_phrase": phrases[r], "y_revised": y_rev}
        for i, y, r, y_rev in kept
    ]
    counts = {
        "problems": len(rows),
        "init_samples": len(attempts),
        "init_correct": int(sum(init_rewards)),
        "revision_attempts": len(candidates),
        "revision_attempts_from_incorrect": sum(1 for c in candidates if c[2] == 0),
        "revision_attempts_from_correct": sum(1 for c in candidates if c[2] == 1),
        "kept": len(kept),
        "kept_from_incorrect": sum(1 for c in kept if c[2] == 0),
        "kept_from_correct": sum(1 for c in kept if c[2] == 1),
    }
    columns = list(rows[0]) + ["y_init", "init_reward", "control_phrase", "y_revised"]
    revisions_ds = Dataset.from_list(records) if records else Dataset.from_dict({c: [] for c in columns})
    return revisions_ds, counts


# --------------------------------------------------------------------------------------------------------------------
# (b) The two SFT datasets
# --------------------------------------------------------------------------------------------------------------------
def build_srt_sft_datasets(revisions: Dataset) -> dict[str, Dataset]:
    """D_rev -> {"generation": ..., "revision": ...} in TRL's prompt/completion format (spec, Phase 1 step 4).

    generation: prompt = x,                                  completion = y_init + "\\n\\n" + P_r + "\\n\\n" + y_rev
    revision:   prompt = x + "\\n\\n" + y_init + "\\n\\n" + P_r (user turn), completion = y_rev
    """
    generation, revision = [], []
    for row in revisions:
        x, y_init, phrase, y_rev = row["prompt"], row["y_init"], row["control_phrase"], row["y_revised"]
        stage1_completion = y_init + control_text(phrase) + y_rev
        if is_conversational({"prompt": x}):
            last = x[-1]
            if last["role"] != "user":
                raise ValueError(f"SRT needs prompts that end with a user turn, got a final {last['role']!r} turn.")
            user = {**last, "content": last["content"] + SEPARATOR + y_init + SEPARATOR + phrase}
            generation.append({"prompt": x, "completion": [{"role": "assistant", "content": stage1_completion}]})
            revision.append({"prompt": x[:-1] + [user], "completion": [{"role": "assistant", "content": y_rev}]})
        else:
            generation.append({"prompt": x, "completion": stage1_completion})
            revision.append({"prompt": x + SEPARATOR + y_init + SEPARATOR + phrase, "completion": y_rev})
    return {"generation": Dataset.from_list(generation), "revision": Dataset.from_list(revision)}


# --------------------------------------------------------------------------------------------------------------------
# (c) The whole phase, resumable
# --------------------------------------------------------------------------------------------------------------------
def _load_model(path: str, config: SRTConfig):
    return create_model_from_path(path, **dict(config.model_init_kwargs or {}))


def _run_stage(model, tokenizer, dataset: Dataset, config: SRTConfig, stage_dir: Path, peft_config, callbacks):
    stage_args = copy.deepcopy(config)
    stage_args.output_dir = str(stage_dir)
    trainer = SFTTrainer(model=model, args=stage_args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(trained):
        trained = trained.merge_and_unload()  # the next stage and Phase 2 start from plain weights
    if trainer.accelerator.is_main_process:
        trained.save_pretrained(stage_dir)
        tokenizer.save_pretrained(stage_dir)
        (stage_dir / DONE_MARKER).write_text(json.dumps({"examples": len(dataset)}))
    trainer.accelerator.wait_for_everyone()
    return trained


def run_srt(model, tokenizer, dataset: Dataset, config: SRTConfig, reward_funcs=None, reward_weights=None,
            peft_config=None, callbacks=None) -> str:
    """Run Phase 1 end to end and return the path of theta_SRT (the last stage's folder).

    Args:
        model: the starting model (path or `PreTrainedModel`). Paths go through `resolve_model_name_or_path`.
        tokenizer: its tokenizer (chat template needed for conversational prompts).
        dataset: problems with a `prompt` column (and `answer` for the default reward).
        config: `SRTConfig`.
        reward_funcs: TRL-style reward functions (default `trl_sdx.rewards.boxed_answer_reward` on `answer`).
        peft_config: optional LoRA config for the SFT stages; each stage's adapter is merged before saving.
    """
    funcs, _, default_reward = resolve_reward_funcs(reward_funcs)
    check_columns(dataset, ["prompt", "answer"] if default_reward else ["prompt"], argument="dataset",
                  hint="SRT samples answers to the `prompt` column and grades them (default: against `answer`).")
    check_tokenizer(tokenizer, argument="tokenizer", need_chat_template=is_conversational(dataset[0]))
    weights = None if reward_weights is None else torch.tensor(reward_weights, dtype=torch.float32)
    model = resolve_model_name_or_path(model)
    if config.use_vllm_collection and not isinstance(model, str):
        raise ValueError("`use_vllm_collection=True` needs the model as a path, not an instance.")
    root = Path(config.output_dir)
    revisions_dir = root / REVISIONS_DIR

    # (a) collection, on the main process only (the others wait, then everyone reads the saved D_rev)
    state = PartialState()
    if not (revisions_dir / "counts.json").is_file() and state.is_main_process:
        torch.manual_seed(config.seed)
        if config.use_vllm_collection:
            sampler = VLLMSampler(model, config)
        else:
            if isinstance(model, str):
                model = _load_model(model, config)
            sampler = HFSampler(model, tokenizer, config)
        revisions, counts = collect_revisions(sampler, tokenizer, dataset, config, funcs, weights)
        if isinstance(sampler, VLLMSampler):
            sampler.close()
        revisions_dir.mkdir(parents=True, exist_ok=True)
        revisions.to_json(str(revisions_dir / "revisions.jsonl"), lines=True)
        (revisions_dir / "counts.json").write_text(json.dumps(counts, indent=2))  # written last: the marker
    state.wait_for_everyone()
    if json.loads((revisions_dir / "counts.json").read_text())["kept"] == 0:
        raise ValueError(
            f"Phase 1 kept no verified revision (see {revisions_dir / 'counts.json'}). Sample more "
            "(`num_init_samples`, `num_revisions`), allow longer answers (`revision_max_new_tokens`), set "
            "`revise_correct=True`, or start from a stronger model. Delete that folder to collect again."
        )
    revisions = Dataset.from_json(str(revisions_dir / "revisions.jsonl"))

    # (b) + (c) the SFT stages, each resumable
    datasets = build_srt_sft_datasets(revisions)
    last_dir = None
    for stage in config.srt_stages:
        stage_dir = root / STAGE_DIRS[stage]
        if not (stage_dir / DONE_MARKER).is_file():
            if last_dir is not None and isinstance(model, str):
                model = _load_model(str(last_dir), config)  # previous stage finished in an earlier run
            elif isinstance(model, str):
                model = _load_model(model, config)
            model = _run_stage(model, tokenizer, datasets[stage], config, stage_dir, peft_config, callbacks)
        else:
            model = str(stage_dir)  # load lazily only if a later stage still has to run
        last_dir = stage_dir
    return str(last_dir)
