"""`EntropyAwareGKDTrainer`: entropy-aware on-policy distillation (EOPD, arXiv 2603.07079) on TRL's
`DistillationTrainer`.

What is inherited unchanged: prompt tokenisation, on-policy generation (transformers or vLLM, tools),
PEFT wrapping, teacher preparation (DeepSpeed/FSDP), logging, checkpointing. What is overridden:

* rollout bookkeeping (GRPO's mechanism): one generation batch feeds `steps_per_generation` micro-batches
  for `num_iterations` passes, and the student's log-probs of the sampled tokens (π_old) are recorded once,
  at rollout time, so later optimizer steps on the same rollout use the PPO ratio;
* the loss: `trl_sdx.losses.fused_entropy_aware_opd_loss` (hidden states + lm_head, default) or
  `entropy_aware_opd_loss` (full logits), with their statistics logged every step.
"""

from __future__ import annotations

import textwrap

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from torch.utils.data import Sampler
from transformers import AutoTokenizer, ProcessorMixin
from trl import DistillationTrainer
from trl.models.utils import disable_gradient_checkpointing, prepare_fsdp
from trl.trainer.utils import (
    RepeatSampler,
    repeat_iterable_dataset,
    shuffle_sequence_dict,
    split_tensor_dict,
)

from ..callbacks import RunArtifactsMixin
from ..liger import apply_liger_kernel_to_models, prepare_liger_kernel
from ..lm_head import completion_logits, gathered_lm_heads, logit_postprocessing
from ..losses import (
    TeacherTargets,
    entropy_aware_opd_loss,
    eopd_loss_from_targets,
    fused_eopd_loss_from_targets,
    fused_entropy_aware_opd_loss,
    score_teacher_targets,
    teacher_targets_from_logits,
    token_logprobs,
    token_logprobs_from_logits,
)
from ..losses._common import gate_enabled, loss_chunk_size_for_vocab, not_finite_message
from ..losses.eopd import full_teacher_needed
from ..models import resolve_model_name_or_path
from ..validation import check_columns, check_fits_context, check_same_vocab, check_tokenizer
from .end_of_turn import resolve_end_of_turn_mapping, teacher_completion_ids
from .entropy_gkd_config import EntropyAwareGKDConfig
from .prompt_length import check_dataset_prompt_lengths, check_prompt_length
from .vllm_sizing import rollout_sized_vllm

logger = get_logger(__name__)

# Loss statistics -> logged metric names. The student entropy keeps TRL's own key (`entropy`), so dashboards that
# already plot it for DistillationTrainer/GRPOTrainer keep working.
# What each means and its counterpart in the official verl code: docs/entropy_gkd.md, "Logged metrics".
METRIC_NAMES = {
    "teacher_entropy": "eopd/teacher_entropy",
    "gate_fraction": "eopd/gate_fraction",
    "fkl_gated": "eopd/fkl_gated",
    "teacher_entropy_gated": "eopd/teacher_entropy_gated",
    "rkl_estimate": "eopd/rkl_estimate",
    "ppo_kl": "eopd/ppo_kl",
    "clip_fraction": "eopd/clip_fraction",
    "clip_fraction_lower": "eopd/clip_fraction_lower",
    "clip_active_fraction": "eopd/clip_active_fraction",
    "student_entropy": "entropy",
}
# Means over gated tokens: undefined (NaN, skipped by `DistillationTrainer.log`) on a micro-batch with none.
GATED_METRICS = ("fkl_gated", "teacher_entropy_gated")

def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


class EntropyAwareGKDTrainer(RunArtifactsMixin, DistillationTrainer):
    """
    On-policy distillation with the entropy-aware objective of "Entropy-Aware On-Policy Distillation of Language
    Models" (Jin et al., 2026). The student samples completions; per completion token the loss is the PPO-clipped
    sampled-token reverse-KL policy gradient (advantage log π_T(y_t) - log π_old(y_t)) plus, where the teacher's
    entropy is at least `tau`, `alpha` times the forward KL over the teacher's top-`fkl_top_k` tokens.

    A drop-in replacement for `trl.DistillationTrainer`: same arguments, plus `teacher_processing_class` (checked
    against the student's tokenizer). Student and teacher must share a vocabulary.

    Example:

    ```python
    >>> from trl_sdx.entropy_gkd import EntropyAwareGKDConfig, EntropyAwareGKDTrainer

    >>> trainer = EntropyAwareGKDTrainer(
    ...     model="Qwen/Qwen3-1.7B-Base",
    ...     teacher_model="Qwen/Qwen3-8B",
    ...     args=EntropyAwareGKDConfig(output_dir="eopd", generation_batch_size=128, per_device_train_batch_size=32),
    ...     train_dataset=dataset,  # a "prompt" column
    ... )
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "distillation", "trl-sdx", "eopd"]
    _name = "EntropyAwareGKD"
    _plot_metrics = ("eopd/teacher_entropy", "eopd/gate_fraction", "eopd/fkl_gated", "eopd/rkl_estimate", "entropy")
    _paper = {
        "title": "Entropy-Aware On-Policy Distillation of Language Models",
        "id": "2603.07079",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{jin2026entropyaware,
                title        = {{Entropy-Aware On-Policy Distillation of Language Models}},
                author       = {Jin and Min and Yang and Kadhe and Zhou and Wei and Baracaldo and Lee},
                year         = 2026,
                booktitle    = {International Conference on Machine Learning (ICML)},
                eprint       = {arXiv:2603.07079},
            }"""),
    }

    def __init__(
        self,
        model,
        teacher_model=None,
        args: EntropyAwareGKDConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
    ):
        # The embedded aliases (`smollm2-135m-instruct`, `<model>:half-depth`) work wherever a model path does.
        model, teacher_model = resolve_model_name_or_path(model), resolve_model_name_or_path(teacher_model)
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = EntropyAwareGKDConfig(f"{str(name).rstrip('/').split('/')[-1]}-EntropyAwareGKD")
        elif not isinstance(args, EntropyAwareGKDConfig):
            raise ValueError(
                f"`args` must be an `EntropyAwareGKDConfig`, got {type(args).__name__}. Build it with "
                "`EntropyAwareGKDConfig(**your_config.to_dict())` or pass the EOPD options directly."
            )
        if teacher_model is None:
            raise ValueError(
                "`teacher_model` is required: pass a model id/path or a `PreTrainedModel` sharing the student's "
                "vocabulary."
            )
        if teacher_model is model and not isinstance(model, str):
            raise ValueError(
                "`teacher_model` is the student object itself; the teacher is frozen, so that would freeze the "
                "student too. Pass a separate copy (`copy.deepcopy(model)`) or load the teacher again."
            )
        prepare_liger_kernel(args)  # `use_liger_kernel`: fails here without CUDA, not in Triton
        if isinstance(processing_class, ProcessorMixin):
            raise ValueError(
                "`processing_class` is a multimodal processor; EntropyAwareGKDTrainer supports text-only models. "
                "Pass the tokenizer of a causal language model."
            )
        # Fail in seconds, before PEFT wrapping and device placement, when both models are already built.
        if not isinstance(model, str) and not isinstance(teacher_model, str):
            check_same_vocab(model, teacher_model)
        if train_dataset is not None:
            check_columns(train_dataset, ["prompt"], hint="EOPD samples completions from the `prompt` column.")
            if not isinstance(train_dataset, IterableDataset) and len(train_dataset) < args.generation_batch_size:
                raise ValueError(
                    f"`train_dataset` has {len(train_dataset)} prompts but one rollout takes "
                    f"`generation_batch_size`={args.generation_batch_size}. Use more prompts or lower "
                    "`generation_batch_size`/`steps_per_generation`/`per_device_train_batch_size`."
                )
            conversational = not isinstance(train_dataset, IterableDataset) and _is_conversational(
                train_dataset[0]["prompt"])
            if conversational and processing_class is not None:
                # Conversational prompts go through the chat template at every rollout: fail now, not at step 1.
                # (A missing pad token is fine: DistillationTrainer falls back to EOS.)
                check_tokenizer(processing_class, need_pad_token=False)
        if teacher_processing_class is None and isinstance(teacher_model, str):
            teacher_processing_class = self._try_load_tokenizer(teacher_model, args)

        with rollout_sized_vllm(args):  # vLLM decodes a whole rollout at once, as in GRPOTrainer
            super().__init__(
                model=model,
                teacher_model=teacher_model,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
            )

        if self.accelerator.is_fsdp2:
            # DistillationTrainer keeps a whole teacher on every GPU under FSDP2 (`prepare_model(evaluation_mode=True)`
            # does not shard); shard it like GRPOTrainer's reference model, so an 8B teacher is not replicated.
            self.teacher_model = prepare_fsdp(self.teacher_model, self.accelerator)
        unwrapped_student = self.accelerator.unwrap_model(self.model)
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        check_same_vocab(unwrapped_student, unwrapped_teacher, self._tokenizer, teacher_processing_class)
        # Only the student (or its adapters) trains; the teacher is a fixed target.
        unwrapped_teacher.requires_grad_(False)
        apply_liger_kernel_to_models(args, unwrapped_student, unwrapped_teacher)  # Liger's model kernels
        if args.use_fused_loss:
            post = logit_postprocessing(unwrapped_student) + logit_postprocessing(unwrapped_teacher)
            if post:
                raise ValueError(
                    f"The models post-process their logits ({', '.join(post)}), which the fused loss (hidden states "
                    "@ lm_head only) would skip. Set `use_fused_loss=False` to compute the loss from the models' own "
                    "logits."
                )

        # The paper's prompt limit: counted over the whole training set now, not met hours into the run.
        check_dataset_prompt_lengths(self.train_dataset, self._tokenize_prompts, args.max_prompt_length)
        # π_old differs from the current student only if an optimizer step happens between the rollout and a
        # micro-batch that uses it; otherwise the loss uses the current log-probs, detached (GRPO does the same).
        self._needs_old_logprobs = args.optimizer_steps_per_rollout > 1
        # The teacher is scored once per rollout into compact targets, unless the objective needs its whole
        # distribution per token (full-vocabulary forward KL, exact reverse KL): then it runs with each loss step.
        self._teacher_at_rollout = not full_teacher_needed(args.tau, args.fkl_top_k, args.rkl_estimator)
        # Base student, instruct teacher: the teacher scores completions with its own end-of-turn token.
        self._end_of_turn = resolve_end_of_turn_mapping(args.end_of_turn_mapping, self._tokenizer,
                                                        teacher_processing_class,
                                                        scored_at_rollout=self._teacher_at_rollout)
        self._loss_chunk_size = args.loss_chunk_size or loss_chunk_size_for_vocab(
            unwrapped_student.get_output_embeddings().weight.shape[0])
        self._loss_compiled = args.resolve_loss_compiled(self.accelerator.device)
        # Loss statistics stay on the device until a logging step reads them (one host sync per log, not per
        # micro-step): [n_metrics + 1] tensors, the last entry being the inputs-finite flag.
        self._pending_loss_stats = {"train": [], "eval": []}

    @staticmethod
    def _try_load_tokenizer(name_or_path: str, args):
        """The teacher's own tokenizer, to compare with the student's; None when it cannot be read offline."""
        try:
            return AutoTokenizer.from_pretrained(
                name_or_path, revision=args.teacher_model_revision, trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError) as error:
            logger.warning(f"Could not load the teacher tokenizer from {name_or_path!r} ({error}); only the vocabulary "
                           "size of the two models is checked.")
            return None

    # ------------------------------------------------------------------------------------------------------------
    # Rollout bookkeeping: GRPO's generation batch (`steps_per_generation` micro-batches, `num_iterations` passes)
    # ------------------------------------------------------------------------------------------------------------

    def get_train_dataloader(self):
        # DistillationTrainer's loader with its "deferred slot-in" filled as in GRPOTrainer: the loader yields whole
        # generation batches (per-device batch x steps_per_generation), each repeated once per micro-step.
        dataset = self.train_dataset
        if isinstance(dataset, IterableDataset):
            if self.shuffle_dataset:
                dataset = dataset.shuffle(seed=self.args.seed)
            dataset = repeat_iterable_dataset(
                dataset,
                mini_repeat_count=1,
                batch_size=self.args.generation_batch_size,
                repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            )
        return self._get_dataloader(
            dataset=dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None) -> Sampler:
        if dataset is None:
            dataset = self.train_dataset
        return RepeatSampler(
            data_source=dataset,
            mini_repeat_count=1,  # one completion per prompt, as in the paper
            batch_size=self.args.generation_batch_size,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.args.num_iterations) == 0 or self._buffered_inputs is None:
            rollout = shuffle_sequence_dict(self._generate_and_score_completions(generation_batch))
            micro_batches = split_tensor_dict(rollout, steps)
            self._set_window_token_counts(micro_batches)
            self._buffered_inputs = micro_batches
        return self._buffered_inputs[self._step % steps]

    def _set_window_token_counts(self, micro_batches: list[dict]) -> None:
        """`num_items_in_batch` of each micro-batch = valid tokens (all processes) of its optimizer step.

        The paper divides the summed loss by the number of valid tokens of the mini-batch an optimizer step
        uses; with several optimizer steps per rollout that is a slice of the rollout, not all of it.
        """
        window = self.args.gradient_accumulation_steps
        for start in range(0, len(micro_batches), window):
            group = micro_batches[start : start + window]
            local = sum(self._loss_mask(batch).sum() for batch in group)
            total = self.accelerator.gather(local.reshape(1)).sum()
            for batch in group:
                batch["num_items_in_batch"] = total

    @staticmethod
    def _loss_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask if inputs.get("tool_mask") is None else mask * inputs["tool_mask"]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        longest_prompt = output["prompt_mask"].sum(1).max().item()
        check_prompt_length(longest_prompt, self.args.max_prompt_length)
        check_fits_context(longest_prompt, self.args.max_completion_length, self.accelerator.unwrap_model(self.model))
        if self.model.training and self._needs_old_logprobs:
            output["old_logprobs"] = self._rollout_logprobs(output)
        if self._teacher_at_rollout:
            output.update(self._score_teacher(output).as_inputs())
        return output

    def _rollout_parts(self, rollout):
        """The rollout in slices of `per_device_train_batch_size` rows: one model forward each."""
        keys = [k for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask")
                if rollout.get(k) is not None]
        batch_size = self.args.per_device_train_batch_size
        for start in range(0, rollout["completion_ids"].size(0), batch_size):
            yield {k: rollout[k][start : start + batch_size] for k in keys}

    @torch.no_grad()
    def _score_teacher(self, rollout) -> TeacherTargets:
        """The teacher's per-token targets of a whole rollout (entropy, log π_T(y_t), top-k ids and renormalised
        log-probs, at the loss temperature), one teacher forward per slice: stored with the rollout, so every
        micro-batch pass and optimizer step on it runs the student alone."""
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        pieces = [
            self._forward_redirection(self.teacher_model, unwrapped_teacher, self._teacher_targets, unwrapped_teacher,
                                      part)
            for part in self._rollout_parts(rollout)
        ]
        return TeacherTargets(*(None if field[0] is None else torch.cat(field) for field in zip(*pieces)))

    def _teacher_targets(self, unwrapped_teacher, inputs) -> TeacherTargets:
        top_k = self.args.fkl_top_k if gate_enabled(self.args.tau) else None
        ids, mask = self._teacher_completion_ids(inputs), self._loss_mask(inputs)
        if self.args.use_fused_loss:
            hidden = self._teacher_hidden_states(unwrapped_teacher, inputs)
            with gathered_lm_heads(unwrapped_teacher) as [(weight, bias)]:
                device = weight.device
                return score_teacher_targets(hidden.to(device), weight, ids.to(device), mask.to(device),
                                             teacher_bias=bias, top_k=top_k, temperature=self.temperature,
                                             chunk_size=self._loss_chunk_size)
        return teacher_targets_from_logits(self._teacher_logits(unwrapped_teacher, inputs), ids, mask, top_k=top_k,
                                           temperature=self.temperature)

    @torch.no_grad()
    def _rollout_logprobs(self, rollout) -> torch.Tensor:
        """log π_old(y_t): the student's log-probs of its sampled tokens, at rollout time, at the loss temperature.

        Computed like the loss computes the current log-probs (hidden @ lm_head for the fused path, the model's
        logits for the plain one), so the ratio starts at exactly 1 up to float rounding.
        """
        unwrapped = self.accelerator.unwrap_model(self.model)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            pieces = [
                self._forward_redirection(self.model_wrapped, unwrapped, self._student_token_logprobs, unwrapped, part)
                for part in self._rollout_parts(rollout)
            ]
        return torch.cat(pieces)

    def _student_token_logprobs(self, unwrapped_student, inputs) -> torch.Tensor:
        """log π(y_t) on the loss's tokens only (0 on padding), in chunks like the fused loss."""
        ids, mask = inputs["completion_ids"], self._loss_mask(inputs)
        if self.args.use_fused_loss:
            hidden = self._model_hidden_states(unwrapped_student, inputs)
            with gathered_lm_heads(unwrapped_student) as [(weight, bias)]:
                device = weight.device
                return token_logprobs(hidden.to(device), weight, ids.to(device), mask.to(device), bias=bias,
                                      temperature=self.temperature, chunk_size=self._loss_chunk_size)
        return token_logprobs_from_logits(self._model_logits(unwrapped_student, inputs), ids, mask,
                                          temperature=self.temperature)

    # ------------------------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _sequence(inputs):
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return input_ids, attention_mask, inputs["completion_ids"].size(1)

    def _model_hidden_states(self, unwrapped_model, inputs) -> torch.Tensor:
        """Final-norm hidden states at the positions that predict the completion tokens: [B, T, H]."""
        input_ids, attention_mask, logits_to_keep = self._sequence(inputs)
        return self._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep)

    def _model_logits(self, unwrapped_model, inputs) -> torch.Tensor:
        """The model's own logits at the positions that predict the completion tokens: [B, T, V]."""
        return completion_logits(unwrapped_model, *self._sequence(inputs), self.model_kwarg_keys)

    def _teacher_completion_ids(self, inputs) -> torch.Tensor:
        """The completion as the teacher sees it: the student's, with its end-of-turn token mapped to the teacher's
        when `end_of_turn_mapping` applies (the student's own ids stay as they are)."""
        return teacher_completion_ids(inputs["completion_ids"], inputs["completion_mask"], self._end_of_turn)

    def _teacher_sequence(self, inputs):
        """(input_ids, attention_mask, completion width) the teacher scores: the student's sequence, its
        end-of-turn token mapped (`_teacher_completion_ids`)."""
        return self._sequence({**inputs, "completion_ids": self._teacher_completion_ids(inputs)})

    def _teacher_hidden_states(self, unwrapped_teacher, inputs) -> torch.Tensor:
        input_ids, attention_mask, logits_to_keep = self._teacher_sequence(inputs)
        return self._get_last_hidden_state(unwrapped_teacher, input_ids, attention_mask, logits_to_keep)

    def _teacher_logits(self, unwrapped_teacher, inputs) -> torch.Tensor:
        return completion_logits(unwrapped_teacher, *self._teacher_sequence(inputs), self.model_kwarg_keys)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Routed through the DDP/FSDP wrapper (as DistillationTrainer does) so gradient sync and sharded parameters
        # work although the loss calls the backbone and the lm_head directly.
        unwrapped_student = self.accelerator.unwrap_model(model)
        loss, stats = self._forward_redirection(model, unwrapped_student, self._eopd_loss, unwrapped_student, inputs)
        n_local = self._loss_mask(inputs).sum()
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            # The loss functions return a token-mean over this micro-batch. Re-weight it to (sum over this micro-batch)
            # / (valid tokens of the whole optimizer step, all processes), per process so DDP's gradient averaging
            # restores the global token-mean: exact under gradient accumulation and uneven completion lengths.
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            loss = loss * (n_local.to(loss.dtype) / normalizer.to(loss.device, loss.dtype))
        self._log_loss_stats(stats)
        return (loss, None) if return_outputs else loss

    def _eopd_loss(self, unwrapped_student, inputs):
        args = self.args
        completion_ids = inputs["completion_ids"]
        loss_mask = self._loss_mask(inputs)
        old_logprobs = inputs.get("old_logprobs") if self.model.training else None
        # check_finite=False: no host sync per micro-step; the flag is read at the next logging step.
        options = dict(tau=args.tau, alpha=args.alpha, top_k=args.fkl_top_k, clip_eps=args.clip_eps,
                       temperature=self.temperature, return_stats=True, check_finite=False)
        targets = TeacherTargets.from_inputs(inputs)
        if targets is not None:  # scored once at rollout time: the loss step runs the student alone
            if args.use_fused_loss:
                student_hidden = self._model_hidden_states(unwrapped_student, inputs)
                # The fused loss reads the head's weight directly (its forward never runs), gathered if sharded; it
                # computes its lm_head gradients inside the forward, so nothing is needed at backward.
                with gathered_lm_heads(unwrapped_student) as [(s_weight, s_bias)]:
                    device = s_weight.device
                    return fused_eopd_loss_from_targets(
                        student_hidden.to(device), s_weight, TeacherTargets(*(None if t is None else t.to(device)
                                                                              for t in targets)),
                        completion_ids.to(device), loss_mask.to(device), old_logprobs, student_bias=s_bias,
                        chunk_size=self._loss_chunk_size, compiled=self._loss_compiled, **options,
                    )
            student_logits = self._model_logits(unwrapped_student, inputs)
            return eopd_loss_from_targets(student_logits, targets, completion_ids, loss_mask, old_logprobs, **options)

        # No stored targets (the full-distribution variants, or a batch this trainer's rollout did not make): the
        # teacher runs with the loss step.
        options["rkl_estimator"] = args.rkl_estimator
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        if args.use_fused_loss:
            student_hidden = self._model_hidden_states(unwrapped_student, inputs)
            with torch.no_grad():
                teacher_hidden = self._forward_redirection(
                    self.teacher_model, unwrapped_teacher, self._teacher_hidden_states, unwrapped_teacher, inputs
                )
            with gathered_lm_heads(unwrapped_student, unwrapped_teacher) as [(s_weight, s_bias), (t_weight, t_bias)]:
                device = s_weight.device
                return fused_entropy_aware_opd_loss(
                    student_hidden.to(device), s_weight, teacher_hidden.to(device), t_weight.to(device),
                    completion_ids.to(device), loss_mask.to(device), old_logprobs, student_bias=s_bias,
                    teacher_bias=t_bias, chunk_size=self._loss_chunk_size, compiled=self._loss_compiled, **options,
                )
        student_logits = self._model_logits(unwrapped_student, inputs)
        with torch.no_grad():
            teacher_logits = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._teacher_logits, unwrapped_teacher, inputs
            )
        return entropy_aware_opd_loss(
            student_logits, teacher_logits.to(student_logits.device), completion_ids, loss_mask, old_logprobs,
            **options,
        )

    def _log_loss_stats(self, stats: dict) -> None:
        """Keep this micro-step's statistics on the device; `log` reads them (no host sync here)."""
        mode = "train" if self.model.training else "eval"
        values = torch.stack([stats[key].detach().float().reshape(()) for key in METRIC_NAMES]
                             + [stats["inputs_finite"].float().reshape(())])
        no_gated = stats["gate_fraction"].reshape(()) == 0
        for key in GATED_METRICS:
            index = list(METRIC_NAMES).index(key)
            values[index] = torch.where(no_gated, torch.full_like(values[index], float("nan")), values[index])
        self._pending_loss_stats[mode].append(values)

    def _flush_loss_stats(self, mode: str) -> None:
        """Once per logging step: gather the pending statistics of every process (one collective, one host read),
        raise if any micro-step saw non-finite inputs, and hand the per-micro-step means over processes to TRL's
        metrics (which `DistillationTrainer.log` averages, skipping NaN)."""
        pending = self._pending_loss_stats[mode]
        if not pending:
            return
        self._pending_loss_stats[mode] = []
        local = torch.stack(pending)  # [micro-steps, n_metrics + 1]
        gathered = self.accelerator.gather(local).reshape(-1, *local.shape).cpu()  # [processes, micro-steps, ...]
        if not bool((gathered[..., -1] == 1).all()):
            raise ValueError(not_finite_message(
                "The student logits, teacher targets or stored old log-probs (or the completion ids are out of the "
                "vocabulary) of at least one micro-batch since the last log"))
        for step_values in gathered[..., :-1].nanmean(0).tolist():
            for name, value in zip(METRIC_NAMES.values(), step_values, strict=True):
                self._metrics[mode][name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self._flush_loss_stats("train" if self.model.training else "eval")
        super().log(logs, start_time)
