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
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import (
    RepeatSampler,
    repeat_iterable_dataset,
    selective_log_softmax,
    shuffle_sequence_dict,
    split_tensor_dict,
)

from ..liger import apply_liger_kernel_to_models, prepare_liger_kernel
from ..lm_head import completion_logits, gathered_lm_heads, logit_postprocessing
from ..losses import entropy_aware_opd_loss
from ..losses.fused import fused_entropy_aware_opd_loss
from ..validation import check_columns, check_fits_context, check_same_vocab, check_tokenizer
from .entropy_gkd_config import EntropyAwareGKDConfig
from .prompt_length import check_prompt_length
from .vllm_sizing import rollout_sized_vllm

logger = get_logger(__name__)

# Loss statistics -> logged metric names. The student entropy keeps TRL's own key (`entropy`), so dashboards that
# already plot it for DistillationTrainer/GRPOTrainer keep working.
METRIC_NAMES = {
    "teacher_entropy": "eopd/teacher_entropy",
    "gate_fraction": "eopd/gate_fraction",
    "fkl_gated": "eopd/fkl_gated",
    "rkl_estimate": "eopd/rkl_estimate",
    "clip_fraction": "eopd/clip_fraction",
    "student_entropy": "entropy",
}

def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


class EntropyAwareGKDTrainer(DistillationTrainer):
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

        # π_old differs from the current student only if an optimizer step happens between the rollout and a
        # micro-batch that uses it; otherwise the loss uses the current log-probs, detached (GRPO does the same).
        self._needs_old_logprobs = args.optimizer_steps_per_rollout > 1

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
        return output

    @torch.no_grad()
    def _rollout_logprobs(self, rollout) -> torch.Tensor:
        """log π_old(y_t): the student's log-probs of its sampled tokens, at rollout time, at the loss temperature.

        Computed like the loss computes the current log-probs (hidden @ lm_head for the fused path, the model's
        logits for the plain one), so the ratio starts at exactly 1 up to float rounding.
        """
        unwrapped = self.accelerator.unwrap_model(self.model)
        batch_size = self.args.per_device_train_batch_size
        pieces = []
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for start in range(0, rollout["completion_ids"].size(0), batch_size):
                part = {k: rollout[k][start : start + batch_size] for k in
                        ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
                pieces.append(
                    self._forward_redirection(self.model_wrapped, unwrapped, self._student_token_logprobs,
                                              unwrapped, part)
                )
        return torch.cat(pieces)

    def _student_token_logprobs(self, unwrapped_student, inputs) -> torch.Tensor:
        completion_ids = inputs["completion_ids"]
        if self.args.use_fused_loss:
            hidden = self._model_hidden_states(unwrapped_student, inputs)
            out = torch.empty(completion_ids.shape, dtype=torch.float32, device=hidden.device)
            flat_hidden, flat_ids = hidden.reshape(-1, hidden.size(-1)), completion_ids.reshape(-1)
            flat_out = out.view(-1)
            chunk = self.args.loss_chunk_size  # bounds the [chunk, vocab] logits like the fused loss does
            with gathered_lm_heads(unwrapped_student) as [(weight, bias)]:
                for start in range(0, flat_ids.numel(), chunk):
                    logits = flat_hidden[start : start + chunk] @ weight.t()
                    if bias is not None:
                        logits = logits + bias
                    flat_out[start : start + chunk] = selective_log_softmax(
                        logits.float() / self.temperature, flat_ids[start : start + chunk]
                    )
            return out
        logits = self._model_logits(unwrapped_student, inputs)
        return selective_log_softmax(logits.float() / self.temperature, completion_ids)

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
        options = dict(tau=args.tau, alpha=args.alpha, top_k=args.fkl_top_k, clip_eps=args.clip_eps,
                       temperature=self.temperature, rkl_estimator=args.rkl_estimator, return_stats=True)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        if args.use_fused_loss:
            student_hidden = self._model_hidden_states(unwrapped_student, inputs)
            with torch.no_grad():
                teacher_hidden = self._forward_redirection(
                    self.teacher_model, unwrapped_teacher, self._model_hidden_states, unwrapped_teacher, inputs
                )
            # The fused loss reads the heads' weights directly (their forward never runs), gathered if sharded; it
            # computes its lm_head gradients inside the forward, so nothing is needed at backward.
            with gathered_lm_heads(unwrapped_student, unwrapped_teacher) as [(s_weight, s_bias), (t_weight, t_bias)]:
                device = s_weight.device
                return fused_entropy_aware_opd_loss(
                    student_hidden.to(device),
                    s_weight,
                    teacher_hidden.to(device),
                    t_weight.to(device),
                    completion_ids.to(device),
                    loss_mask.to(device),
                    old_logprobs,
                    student_bias=s_bias,
                    teacher_bias=t_bias,
                    chunk_size=args.loss_chunk_size,
                    **options,
                )
        student_logits = self._model_logits(unwrapped_student, inputs)
        with torch.no_grad():
            teacher_logits = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._model_logits, unwrapped_teacher, inputs
            )
        return entropy_aware_opd_loss(
            student_logits, teacher_logits.to(student_logits.device), completion_ids, loss_mask, old_logprobs,
            **options,
        )

    def _log_loss_stats(self, stats: dict) -> None:
        # Gathered after `_forward_redirection` returns (a collective inside the wrapped forward could hang), then
        # averaged over processes and, by `DistillationTrainer.log`, over the micro-steps since the last log.
        mode = "train" if self.model.training else "eval"
        values = {key: stats[key].detach().float().reshape(1) for key in METRIC_NAMES}
        if values["gate_fraction"].item() == 0.0:
            # No gated token: the mean forward KL over gated tokens is undefined, not 0. NaN is skipped by
            # `DistillationTrainer.log`, so it does not drag the average of the other micro-steps down.
            values["fkl_gated"] = torch.full_like(values["fkl_gated"], float("nan"))
        gathered = self.accelerator.gather_for_metrics(torch.cat(list(values.values())).reshape(1, -1))
        for name, value in zip(METRIC_NAMES.values(), gathered.nanmean(0).tolist(), strict=True):
            self._metrics[mode][name].append(value)
