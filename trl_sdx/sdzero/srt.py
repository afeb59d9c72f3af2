"""SD-Zero Phase 1, Self-Revision Training (SRT): teach the model to revise its own answers, giving theta_SRT.

1. Collect D_rev (`srt_collect.collect_revisions`): y_init, its reward r, and verified-correct y_revised sampled
   after "\\n\\n" + P_r + "\\n\\n". Sharded over the processes of a multi-process launch.
2. Build the two SFT sets (`srt_data.prepare_srt_data`): clean, deduplicate, split by the stage-2 quota.
3. Run them with TRL's `SFTTrainer` (completion-only loss), the revision stage starting from the generation-stage
   weights. A row longer than `max_length` is never cut: it is dropped and counted, or raises (`long_rows`).

Every part leaves its output and a marker under `output_dir`; rerunning `run_srt` skips what is finished. Each stage
folder also holds the control phrases it was trained with (`sdzero_control_phrases.json`), which Phase 2 reads.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import SFTTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import create_model_from_path

from trl_sdx.models import resolve_model_name_or_path
from trl_sdx.sdzero.control_phrases import save_control_phrases
from trl_sdx.sdzero.rewards import PHASE1_DEFAULT_REWARD, resolve_reward_funcs
from trl_sdx.sdzero.srt_collect import HFSampler, VLLMSampler, collect_revisions
from trl_sdx.sdzero.srt_config import SRT_STAGES, SRTConfig
from trl_sdx.sdzero.srt_data import (
    format_generation_example,
    format_revision_example,
    prepare_srt_data,
)
from trl_sdx.validation import check_columns, check_tokenizer

__all__ = ["DONE_MARKER", "SRT_STAGES", "SRTConfig", "build_srt_sft_datasets", "collect_revisions", "run_srt"]

REVISIONS_DIR = "revisions"
STAGE_DIRS = {"generation": "stage1_generation", "revision": "stage2_revision"}
DONE_MARKER = "SRT_DONE.json"

logger = logging.getLogger(__name__)


def build_srt_sft_datasets(revisions, sft_system_prompt: str | None = None) -> dict[str, Dataset]:
    """Every D_rev row in both formats (no cleaning, deduplication or split; `prepare_srt_data` does those)."""
    rows = [dict(row) for row in revisions]
    return {"generation": Dataset.from_list([format_generation_example(r, sft_system_prompt) for r in rows]),
            "revision": Dataset.from_list([format_revision_example(r, sft_system_prompt) for r in rows])}


def _load_model(path: str, config: SRTConfig):
    """As `SFTTrainer` loads a path, except that any multi-process launch (DDP, FSDP, DeepSpeed) gets
    `device_map=None`: "auto" would spread one copy over every GPU of each process."""
    kwargs = dict(config.model_init_kwargs or {})
    kwargs.setdefault("trust_remote_code", config.trust_remote_code)
    if PartialState().num_processes > 1:
        kwargs["device_map"] = None
    return create_model_from_path(path, **kwargs)


def _drop_long_rows(trainer: SFTTrainer, config: SRTConfig, stage: str) -> int:
    """Remove the tokenised rows longer than `config.max_length` (or raise); returns how many were dropped."""
    if config.max_length is None:
        return 0
    dataset = trainer.train_dataset
    lengths = [len(ids) for ids in dataset["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > config.max_length]
    if not too_long:
        return 0
    if config.long_rows == "error":
        raise ValueError(
            f"SRT {stage} stage: {len(too_long)} of {len(lengths)} rows are longer than `max_length` "
            f"({config.max_length} tokens; longest {max(lengths)}). Raise `max_length`, or set `long_rows='drop'` to "
            "drop them with a count. Rows are never truncated: a cut stage-1 row would lose its revision."
        )
    logger.warning(f"SRT {stage} stage: dropped {len(too_long)} of {len(lengths)} rows longer than `max_length` "
                   f"({config.max_length} tokens; longest {max(lengths)}).")
    keep = sorted(set(range(len(lengths))) - set(too_long))
    trainer.train_dataset = dataset.select(keep)
    return len(too_long)


def _run_stage(model, tokenizer, dataset: Dataset, config: SRTConfig, stage: str, stage_dir: Path, peft_config,
               callbacks):
    stage_args = copy.deepcopy(config)
    stage_args.output_dir = str(stage_dir)
    stage_args.max_length = None  # SFTTrainer would truncate silently; long rows are handled by `_drop_long_rows`
    stage_args.model_init_kwargs = None  # already applied by `_load_model`; SFTTrainer warns it would ignore them
    trainer = SFTTrainer(model=model, args=stage_args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)
    dropped = _drop_long_rows(trainer, config, stage)
    if len(trainer.train_dataset) == 0:
        raise ValueError(f"SRT {stage} stage: no row fits `max_length` ({config.max_length}).")
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(trained):
        trained = trained.merge_and_unload()  # the next stage and Phase 2 start from plain weights
    if trainer.accelerator.is_main_process:
        trained.save_pretrained(stage_dir)
        tokenizer.save_pretrained(stage_dir)
        save_control_phrases(stage_dir, config.correct_phrase, config.incorrect_phrase)
        (stage_dir / DONE_MARKER).write_text(json.dumps({"examples": len(dataset), "dropped_too_long": dropped,
                                                         "trained_on": len(trainer.train_dataset)}))
    trainer.accelerator.wait_for_everyone()
    return trained


def _collect(model, tokenizer, dataset, config: SRTConfig, funcs, weights, revisions_dir: Path):
    """Collection on every process, then D_rev and its counts written by the main one. Returns the model (loaded
    from its path if the transformers sampler needed it)."""
    state = PartialState()
    if config.use_vllm_collection:
        sampler = VLLMSampler(model, config, state.num_processes)
    else:
        if isinstance(model, str):
            model = _load_model(model, config)
        model.to(state.device)
        sampler = HFSampler(model, tokenizer, config)
    revisions, counts = collect_revisions(sampler, tokenizer, dataset, config, funcs, weights)
    sampler.close()
    if state.is_main_process:
        revisions_dir.mkdir(parents=True, exist_ok=True)
        revisions.to_json(str(revisions_dir / "revisions.jsonl"), lines=True)
        (revisions_dir / "counts.json").write_text(json.dumps(counts, indent=2))  # written last: the marker
    state.wait_for_everyone()
    return model


def run_srt(model, tokenizer, dataset: Dataset, config: SRTConfig, reward_funcs=None, reward_weights=None,
            peft_config=None, callbacks=None) -> str:
    """Run Phase 1 end to end and return the path of theta_SRT (the last stage's folder).

    Args:
        model: the starting model (path or `PreTrainedModel`). Paths go through `resolve_model_name_or_path`.
        tokenizer: its tokenizer (chat template needed for conversational prompts).
        dataset: problems with a `prompt` column (and `answer` for the default reward).
        config: `SRTConfig`.
        reward_funcs: TRL-style reward functions (default `trl_sdx.rewards.boxed_answer_reward` on `answer`: the
            last `\\boxed{}` by math equivalence; an unboxed answer is wrong).
        peft_config: optional LoRA config for the SFT stages; each stage's adapter is merged before saving.
    """
    funcs, _, default_reward = resolve_reward_funcs(reward_funcs, default=PHASE1_DEFAULT_REWARD)
    check_columns(dataset, ["prompt", "answer"] if default_reward else ["prompt"], argument="dataset",
                  hint="SRT samples answers to the `prompt` column and grades them (default: against `answer`).")
    check_tokenizer(tokenizer, argument="tokenizer", need_chat_template=is_conversational(dataset[0]))
    weights = None if reward_weights is None else torch.tensor(reward_weights, dtype=torch.float32)
    model = resolve_model_name_or_path(model)
    if config.use_vllm_collection and not isinstance(model, str):
        raise ValueError("`use_vllm_collection=True` needs the model as a path, not an instance.")
    root = Path(config.output_dir)
    revisions_dir = root / REVISIONS_DIR
    state = PartialState()

    # (a) collection, sharded over the processes
    if not (revisions_dir / "counts.json").is_file():
        model = _collect(model, tokenizer, dataset, config, funcs, weights, revisions_dir)
    if json.loads((revisions_dir / "counts.json").read_text())["kept"] == 0:
        raise ValueError(
            f"Phase 1 kept no verified revision (see {revisions_dir / 'counts.json'}). Sample more "
            "(`num_init_samples`, `num_revisions`), allow longer answers (`revision_max_new_tokens`), set "
            "`revise_correct=True`, or start from a stronger model. Delete that folder to collect again."
        )
    revisions = [dict(row) for row in Dataset.from_json(str(revisions_dir / "revisions.jsonl"))]

    # (b) the two SFT sets
    datasets, split_counts = prepare_srt_data(revisions, stage2_size=config.stage2_size, seed=config.seed,
                                              clean=config.clean_revisions, sft_system_prompt=config.sft_system_prompt)
    if state.is_main_process:
        (revisions_dir / "sft_split.json").write_text(json.dumps(split_counts, indent=2))
        print(f"SRT data: {split_counts['stage1_generation']} stage-1 (generation) rows, "
              f"{split_counts['stage2_revision']} stage-2 (revision) rows ({split_counts['duplicates_removed']} "
              f"duplicates removed, {split_counts['correct_init_unused']} correct-init tuples unused).")
    if "generation" in config.srt_stages and len(datasets["generation"]) == 0:
        raise ValueError(
            f"The stage-1 (generation) set is empty: the stage-2 quota `stage2_size` ({config.stage2_size}) took all "
            f"{split_counts['stage2_revision']} usable tuples, and stage 1 uses incorrect-init tuples only. Lower "
            "`stage2_size`, collect more (`max_revisions`, a larger dataset), or set `srt_stages=['revision']`."
        )

    # (c) the SFT stages, each resumable
    last_dir = None
    for stage in config.srt_stages:
        stage_dir = root / STAGE_DIRS[stage]
        if not (stage_dir / DONE_MARKER).is_file():
            if isinstance(model, str):
                model = _load_model(model, config)  # the start model, or the stage finished in an earlier run
            model = _run_stage(model, tokenizer, datasets[stage], config, stage, stage_dir, peft_config, callbacks)
        else:
            model = str(stage_dir)  # load lazily only if a later stage still has to run
        last_dir = stage_dir
    return str(last_dir)
