"""`SDZeroTrainer`: Self-Distillation Zero, Phase 2 (arXiv 2604.12002), on TRL's `DistillationTrainer`.

Why `DistillationTrainer` (stable) and not the experimental `SDPOTrainer`: SD-Zero samples ONE completion per prompt
and distils a frozen teacher on it, which is exactly DistillationTrainer's on-policy loop (n = 1, generation once per
accumulation window, vLLM, tools, a separate `teacher_model` / `teacher_model_name_or_path`, and the hidden-state
path + DDP/FSDP forward redirection the fused loss needs). SDPOTrainer is GRPO-shaped (groups of generations,
advantages, policy loss, a teacher prompt mined from *peer* rollouts) and experimental. We add only what SD-Zero
needs: reward functions, the reward-conditioned teacher input, the top-k KL, and the teacher options.
"""

from __future__ import annotations

import copy
import inspect
import textwrap
from contextlib import nullcontext

import torch
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import DistillationTrainer
from trl.data_utils import is_conversational
from trl.models.utils import prepare_fsdp
from trl.trainer.utils import get_config_model_id

from trl_sdx.callbacks import RunArtifactsMixin
from trl_sdx.liger import apply_liger_kernel_to_models, prepare_liger_kernel, resolve_loss_implementation
from trl_sdx.lm_head import completion_logits, gathered_lm_heads, logit_postprocessing
from trl_sdx.losses import fused_topk_distillation_loss, liger_topk_distillation_loss, topk_distillation_loss
from trl_sdx.models import resolve_model_name_or_path
from trl_sdx.sdzero.control_phrases import resolve_control_phrases
from trl_sdx.sdzero.rewards import binary_reward, resolve_reward_funcs, score_completions
from trl_sdx.sdzero.sdzero_config import SDZeroConfig
from trl_sdx.sdzero.teacher_inputs import build_teacher_inputs, control_text
from trl_sdx.sdzero.teacher_sync import (
    TeacherSyncCallback,
    check_mergeable,
    check_syncable,
    copy_student_into_teacher,
    load_teacher_state,
    merge_and_reset_lora,
    save_teacher_state,
)
from trl_sdx.validation import check_columns, check_same_vocab, check_tokenizer

logger = get_logger(__name__)

def _forward_keys(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _resolve_teacher_mode(mode: str, has_teacher: bool, has_peft: bool) -> str:
    """The effective teacher source; raises on combinations that cannot work."""
    if mode == "auto":
        return "separate" if has_teacher else ("disable_adapter" if has_peft else "copy")
    if mode == "separate" and not has_teacher:
        raise ValueError(
            "`teacher_mode='separate'` needs a teacher: pass `teacher_model=` (a model or path) or set "
            "`teacher_model_name_or_path` (for the paper's setting, the Phase 1 checkpoint theta_SRT)."
        )
    if mode in ("copy", "disable_adapter") and has_teacher:
        raise ValueError(
            f"`teacher_mode={mode!r}` builds the teacher from the student, but a teacher model was also given "
            "(`teacher_model` / `teacher_model_name_or_path`). Drop one, or use `teacher_mode='separate'`."
        )
    if mode == "disable_adapter" and not has_peft:
        raise ValueError(
            "`teacher_mode='disable_adapter'` uses the training model with its LoRA adapters disabled as teacher, "
            "so the student must be a PEFT model: pass `peft_config=LoraConfig(...)` (CLI: `--use_peft`), or use "
            "`teacher_mode='copy'` for a frozen copy of the student."
        )
    return mode


class SDZeroTrainer(RunArtifactsMixin, DistillationTrainer):
    """Phase 2 of Self-Distillation Zero: on-policy distillation from the model's own reward-conditioned reviser.

    Per prompt x: sample y ~ pi_theta(.|x), grade it (r in {0, 1}), build the teacher input
    `chat(x) + y + "\\n\\n" + P_r + "\\n\\n" + y` (`build_teacher_inputs`), and minimise the top-k KL
    (`trl_sdx.losses.topk_distillation_loss`) between the student on `chat(x) + y` and the teacher on the second
    copy of y:

        L(theta) = E_x E_{y~pi_theta(.|x)} sum_t D( pi_theta(.|x, y_<t) , pi_T(.|x, y, P_r, y_<t) ) / #tokens

    Example:

    ```python
    from trl_sdx.data import make_arithmetic_dataset
    from trl_sdx.sdzero import SDZeroConfig, SDZeroTrainer

    trainer = SDZeroTrainer(
        model="path/to/theta_SRT",                 # Phase 1 output (`trl-sdx sdzero-srt`)
        teacher_model="path/to/theta_SRT",         # frozen reviser (paper setting)
        args=SDZeroConfig(output_dir="sdzero"),
        train_dataset=make_arithmetic_dataset(512),  # `prompt` + `answer` columns
    )
    trainer.train()
    ```

    Args:
        model: student (path, `PreTrainedModel` or `PeftModel`); paths go through
            `trl_sdx.models.resolve_model_name_or_path`.
        teacher_model: optional frozen teacher (path or model) sharing the vocabulary; see `SDZeroConfig.teacher_mode`.
        reward_funcs: callables in TRL's reward-function form (or import paths); default
            `trl_sdx.rewards.boxed_answer_reward` against the dataset's `answer` column.
        args: `SDZeroConfig`.
        The other arguments are those of `trl.DistillationTrainer`.
    """

    _tag_names = ["trl", "trl-sdx", "sdzero", "distillation"]
    _name = "SD-Zero"
    _plot_metrics = ("sdzero/reward_mean", "sdzero/kl", "sdzero/kl_correct", "sdzero/kl_incorrect")
    _paper = {
        "title": "Self-Distillation Zero: Self-Revision Turns Binary Rewards into Dense Supervision",
        "id": "2604.12002",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{sdzero2026,
                title        = {{Self-Distillation Zero: Self-Revision Turns Binary Rewards into Dense Supervision}},
                year         = 2026,
                eprint       = {arXiv:2604.12002}
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | None = None,
        reward_funcs=None,
        args: SDZeroConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SDZeroConfig(f"{str(name).split('/')[-1]}-SDZero")
        if not isinstance(args, SDZeroConfig):
            raise ValueError(f"`args` must be an `SDZeroConfig`, got {type(args).__name__}.")
        prepare_liger_kernel(args)  # `use_liger_kernel`: fails here without CUDA, not in Triton
        if args.remove_unused_columns:
            raise ValueError(
                "`remove_unused_columns=True` would drop the dataset columns the reward functions read (e.g. "
                "`answer`). Set `remove_unused_columns=False` (the default)."
            )
        model = resolve_model_name_or_path(model)
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        teacher_model = resolve_model_name_or_path(teacher_model)
        # P_r: as given, else the pair Phase 1 saved with theta_SRT (the teacher's folder first), else the released one
        args.correct_phrase, args.incorrect_phrase = resolve_control_phrases(
            args.correct_phrase, args.incorrect_phrase, teacher_model, model
        )

        self.reward_funcs, self.reward_func_names, default_reward = resolve_reward_funcs(reward_funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"`reward_weights` has {len(args.reward_weights)} entries for {len(self.reward_funcs)} reward "
                "functions."
            )
        required = ["prompt", "answer"] if default_reward else ["prompt"]
        hint = ("Map your data to a `prompt` column (conversational messages or text) and a reference `answer` "
                "column for the default reward `math_verify_reward`, or pass your own `reward_funcs`.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: SD-Zero samples its completions from the dataset prompts.")
        check_columns(train_dataset, required, argument="train_dataset", hint=hint)
        for split, dataset in (eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]):
            if dataset is not None:
                check_columns(dataset, required, argument=f"eval_dataset{f'[{split!r}]' if split else ''}", hint=hint)

        if processing_class is None:
            source = model if isinstance(model, str) else get_config_model_id(model.config)
            processing_class = AutoProcessor.from_pretrained(
                source, padding_side="left", truncation_side="left", trust_remote_code=args.trust_remote_code
            )
        if isinstance(processing_class, ProcessorMixin):
            raise ValueError(
                "SDZeroTrainer is text-only: its teacher input is built by token concatenation. Pass a tokenizer "
                "(`processing_class=AutoTokenizer.from_pretrained(...)`)."
            )
        if processing_class is not None and processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token  # DistillationTrainer's convention
        first_prompt = next(iter(train_dataset))["prompt"]
        check_tokenizer(processing_class, need_chat_template=is_conversational({"prompt": first_prompt}))

        has_peft = peft_config is not None or (not isinstance(model, str) and is_peft_model(model))
        self.teacher_mode = _resolve_teacher_mode(args.teacher_mode, teacher_model is not None, has_peft)
        if self.teacher_mode == "copy":
            teacher_model = self._initial_student_copy(model, args)
        if isinstance(teacher_model, PreTrainedModel) and not isinstance(model, str):
            check_same_vocab(model, teacher_model)

        super().__init__(
            model=model,
            teacher_model=teacher_model if self.teacher_mode != "disable_adapter" else None,
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

        if self.teacher_mode == "disable_adapter":
            self.teacher_model = None  # the teacher is `self.model` under `disable_adapter()`
            teacher_unwrapped = self.accelerator.unwrap_model(self.model)
        else:
            if getattr(self.accelerator, "is_fsdp2", False):
                # DistillationTrainer keeps a whole teacher on every GPU under FSDP2; shard it like GRPOTrainer's
                # reference model (θ_SRT is the student's size: replicating it would double the model memory).
                # Teacher sync then copies shard by shard (`teacher_sync._assign`).
                self.teacher_model = prepare_fsdp(self.teacher_model, self.accelerator)
            teacher_unwrapped = self.accelerator.unwrap_model(self.teacher_model)
            check_same_vocab(self.accelerator.unwrap_model(self.model), teacher_unwrapped)
        self._teacher_forward_keys = _forward_keys(teacher_unwrapped)
        apply_liger_kernel_to_models(args, self.accelerator.unwrap_model(self.model), teacher_unwrapped)
        self.loss_implementation = resolve_loss_implementation(args.loss_implementation, self.accelerator.device)

        # P_r tokenised once; chosen per sample by r (spec: "\n\n" + P_r + "\n\n", token-level concatenation).
        self._delimiter_ids = {
            1: self._tokenizer(control_text(args.correct_phrase), add_special_tokens=False)["input_ids"],
            0: self._tokenizer(control_text(args.incorrect_phrase), add_special_tokens=False)["input_ids"],
        }
        self.reward_weights = torch.tensor(args.reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float32)

        self.teacher_max_length = args.teacher_max_length
        if self.teacher_max_length is None:
            teacher_config = teacher_unwrapped.config.get_text_config()
            self.teacher_max_length = getattr(teacher_config, "max_position_embeddings", None)

        self.use_fused_loss = args.use_fused_loss
        if self.use_fused_loss and (
            logit_postprocessing(self.accelerator.unwrap_model(self.model)) or logit_postprocessing(teacher_unwrapped)
        ):
            logger.warning("The model rescales or caps its logits after the lm_head; using the plain (full-logits) "
                           "loss instead of the fused one.")
            self.use_fused_loss = False

        if args.teacher_sync_steps > 0:
            self._check_sync_supported(teacher_unwrapped)
            self.add_callback(TeacherSyncCallback(self.sync_teacher, args.teacher_sync_steps))

    # ----------------------------------------------------------------------------------------------------------------
    # Teacher
    # ----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _initial_student_copy(model, args):
        """`teacher_mode='copy'`: theta_SRT twice, like the released code (same path loaded as a second model)."""
        if isinstance(model, str):
            if args.teacher_model_init_kwargs is None and args.model_init_kwargs is not None:
                kwargs = dict(args.model_init_kwargs)
                if isinstance(kwargs.get("dtype"), torch.dtype):  # DistillationTrainer expects the dtype's name
                    kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
                kwargs.pop("quantization_config", None)
                args.teacher_model_init_kwargs = kwargs
            return model
        teacher = copy.deepcopy(model)
        if is_peft_model(teacher):
            teacher = teacher.merge_and_unload()  # the student's effective weights, as a plain model
        teacher.requires_grad_(False)
        return teacher.eval()

    def _check_sync_supported(self, teacher_unwrapped) -> None:
        # FSDP2: every parameter is a DTensor (the teacher is sharded like the student in __init__), so the sync copies
        # shard by shard (`teacher_sync._assign`; it also gathers into a replicated teacher, should one be passed).
        # FSDP1 flattens each wrapped unit into one FlatParameter and ZeRO-3 partitions parameters outside their
        # modules: neither has the tensor-by-tensor view a copy needs, so sync is refused there.
        deepspeed_plugin = self.args.deepspeed_plugin
        fsdp2 = self.is_fsdp_enabled and getattr(self.accelerator, "is_fsdp2", False)
        if (self.is_fsdp_enabled and not fsdp2) or (deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3):
            raise ValueError("`teacher_sync_steps` > 0 is not supported with FSDP1 or DeepSpeed ZeRO-3 (flattened or "
                             "partitioned weights); use FSDP2 (`fsdp_version: 2`), ZeRO-1/2 or DDP, or set "
                             "`teacher_sync_steps=0`.")
        if fsdp2 and self.teacher_mode == "disable_adapter":
            raise ValueError("`teacher_sync_steps` > 0 with `teacher_mode='disable_adapter'` is not supported under "
                             "FSDP2 (folding the LoRA update into a sharded base layer is not implemented); use "
                             "`teacher_mode='copy'`, or DDP.")
        student = self.accelerator.unwrap_model(self.model)
        if self.teacher_mode == "disable_adapter":
            check_mergeable(student)
        else:
            check_syncable(student, teacher_unwrapped)

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Hard-copy the current student into the teacher (the paper's iterative self-evolution)."""
        student = self.accelerator.unwrap_model(self.model)
        if self.teacher_mode == "disable_adapter":
            merge_and_reset_lora(student)
        else:
            copy_student_into_teacher(student, self.accelerator.unwrap_model(self.teacher_model))
        logger.info(f"SD-Zero: teacher synced to the student at step {self.state.global_step}.")

    def _synced_module(self):
        """The module whose weights a sync changes: the teacher, or the PEFT student's base (adapter-disabled)."""
        if self.teacher_mode == "disable_adapter":
            return self.accelerator.unwrap_model(self.model)
        return self.accelerator.unwrap_model(self.teacher_model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The model as TRL saves it, plus (when `teacher_sync_steps` > 0) the teacher's synced weights
        (`sdzero_teacher.pt`), which a checkpoint of the student alone does not hold. Also on every checkpoint."""
        super().save_model(output_dir, _internal_call)
        if self.args.teacher_sync_steps > 0:  # every process: FSDP2 shards are gathered; the main one writes
            save_teacher_state(self._synced_module(), output_dir or self.args.output_dir, self.teacher_mode,
                               write=self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.args.teacher_sync_steps > 0 and load_teacher_state(self._synced_module(), resume_from_checkpoint,
                                                                    self.teacher_mode):
            logger.info(f"SD-Zero: teacher restored from {resume_from_checkpoint}.")

    def _teacher_context(self):
        if self.teacher_mode == "disable_adapter":
            return self.accelerator.unwrap_model(self.model).disable_adapter()
        return nullcontext()

    # ----------------------------------------------------------------------------------------------------------------
    # Rollouts: DistillationTrainer samples y; we grade it and build the teacher input.
    # ----------------------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device

        prompts = [example["prompt"] for example in inputs]
        completion_ids_list = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(output["completion_ids"].cpu(), output["completion_mask"].cpu(), strict=True)
        ]
        texts = self.processing_class.batch_decode(completion_ids_list, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(inputs[0]) else texts

        rewards_per_func = score_completions(
            self.reward_funcs, inputs, prompts, completions, completion_ids_list, trainer_state=self.state
        )
        rewards = binary_reward(rewards_per_func, self.reward_weights, self.args.reward_threshold)

        teacher = build_teacher_inputs(
            output["prompt_ids"], output["prompt_mask"], output["completion_ids"], output["completion_mask"],
            rewards, self._delimiter_ids, self.teacher_max_length,
            pad_token_id=self._tokenizer.pad_token_id, eos_token_ids=self.eos_token_ids,
            keep_eos_in_first_copy=self.args.keep_eos_in_first_copy,
        )
        loss_mask = teacher.loss_mask
        if output.get("tool_mask") is not None:  # tool results are not the model's tokens: never scored
            loss_mask = loss_mask * output["tool_mask"]

        output.update(
            teacher_input_ids=teacher.input_ids,
            teacher_attention_mask=teacher.attention_mask,
            loss_mask=loss_mask,
            sdzero_rewards=rewards.to(device=device, dtype=torch.float32),
            # the token count the GA-correct reduction divides by (the base counted untruncated completions)
            num_items_in_batch=self.accelerator.gather(loss_mask.sum()).sum(),
        )

        gathered = self.accelerator.gather
        self._metrics[mode]["sdzero/reward_mean"].append(gathered(rewards.to(device).float()).mean().item())
        per_func = gathered(rewards_per_func.to(device)).nanmean(dim=0)
        for name, value in zip(self.reward_func_names, per_func.tolist(), strict=True):
            self._metrics[mode][f"rewards/{name}/mean"].append(value)
        self._metrics[mode]["sdzero/truncated_fraction"].append(gathered(teacher.truncated.float()).mean().item())
        self._metrics[mode]["sdzero/zero_weight_fraction"].append(
            (1.0 - gathered(teacher.sample_weight.float())).mean().item()
        )
        return output

    # ----------------------------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("SDZeroTrainer does not return model outputs from `compute_loss`.")
        # Like DistillationTrainer: divide by the token count of the whole generation batch (computed after
        # generation, per process) so gradient accumulation reproduces the token-mean of the full batch.
        num_items = None
        if self.model.training and inputs.get("num_items_in_batch") is not None:
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward so DDP/FSDP hooks fire (DistillationTrainer's `_forward_redirection`).
        loss, kl_terms = self._forward_redirection(
            model, unwrapped, self._sdzero_loss, unwrapped, inputs, num_items
        )
        self._log_kl_by_reward(kl_terms, inputs)
        return loss

    def _sdzero_loss(self, student, inputs, num_items):
        completion_ids = inputs["completion_ids"]
        width = completion_ids.size(1)
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["loss_mask"]
        options = dict(kl_type=self.args.kl_type, mixed_kl_weight=self.args.mixed_kl_weight,
                       top_k=self.args.distillation_topk, temperature=self.temperature, return_stats=True)

        if self.use_fused_loss:
            student_hidden = self._get_last_hidden_state(student, input_ids, attention_mask, width)
            with torch.no_grad():
                teacher_hidden = self._teacher_hidden(student, inputs, width)
            # The heads are read without their forward: gathered under ZeRO-3 / materialised under FSDP2.
            teacher_unwrapped = self._teacher_unwrapped(student)
            with gathered_lm_heads(student, teacher_unwrapped) as [(s_weight, s_bias), (t_weight, t_bias)]:
                device = s_weight.device
                if self.loss_implementation == "liger":  # one Liger call per reward: per-reward KL sums
                    fused_loss, options["groups"] = liger_topk_distillation_loss, inputs["sdzero_rewards"]
                else:
                    fused_loss = fused_topk_distillation_loss
                loss, stats = fused_loss(
                    student_hidden.to(device), s_weight, teacher_hidden.to(device), t_weight.to(device),
                    loss_mask.to(device), student_bias=s_bias, teacher_bias=t_bias,
                    chunk_size=self.args.loss_chunk_size, **options,
                )
        else:
            student_logits = completion_logits(student, input_ids, attention_mask, width, self.model_kwarg_keys)
            # the student (adapters off) or the teacher's prepared wrapper, whose forward gathers DeepSpeed shards
            teacher = student if self.teacher_mode == "disable_adapter" else self.teacher_model
            with torch.no_grad(), self._teacher_context():
                teacher_logits = completion_logits(
                    teacher, inputs["teacher_input_ids"], inputs["teacher_attention_mask"], width,
                    self._teacher_forward_keys,
                )
            loss, stats = topk_distillation_loss(student_logits, teacher_logits.to(student_logits.device),
                                                 loss_mask.to(student_logits.device), **options)
        if num_items is not None:  # token-mean of this micro-batch -> its share of the generation-batch token-mean
            loss = loss * loss_mask.sum() / num_items
        # per-token loss [B, T]; the Liger kernel gives per-reward (sum, count) instead
        return loss, stats.get("per_token_loss", stats)

    def _teacher_unwrapped(self, student):
        return student if self.teacher_mode == "disable_adapter" else self.accelerator.unwrap_model(self.teacher_model)

    def _teacher_hidden(self, student, inputs, width):
        ids, mask = inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
        if self.teacher_mode == "disable_adapter":
            with self._teacher_context():
                return self._get_last_hidden_state(student, ids, mask, width)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        # Through the teacher's own wrapper so DeepSpeed materialises its shards (as DistillationTrainer does).
        return self._forward_redirection(self.teacher_model, teacher, self._get_last_hidden_state, teacher, ids, mask,
                                         width)

    def _log_kl_by_reward(self, per_token_loss, inputs) -> None:
        """Teacher-student KL (the per-token loss) on r = 1 and r = 0 samples separately, token-averaged."""
        mode = "train" if self.model.training else "eval"
        if isinstance(per_token_loss, dict):  # Liger kernel: one (loss sum, token count) per reward value
            self._log_kl_from_group_sums(per_token_loss, mode)
            return
        mask = inputs["loss_mask"].to(per_token_loss.dtype)
        rewards = inputs["sdzero_rewards"].to(per_token_loss.device)
        groups = (("sdzero/kl", torch.ones_like(rewards)), ("sdzero/kl_correct", rewards),
                  ("sdzero/kl_incorrect", 1.0 - rewards))
        for name, selected in groups:
            rows = mask * selected.unsqueeze(1)
            total = self.accelerator.gather((per_token_loss * rows).sum()).sum()
            count = self.accelerator.gather(rows.sum()).sum()
            self._metrics[mode][name].append((total / count).item() if count > 0 else float("nan"))

    def _log_kl_from_group_sums(self, stats, mode) -> None:
        values, sums, counts = stats["group_values"], stats["group_loss_sums"], stats["group_token_counts"]
        groups = (("sdzero/kl", torch.ones_like(values, dtype=torch.bool)), ("sdzero/kl_correct", values == 1),
                  ("sdzero/kl_incorrect", values == 0))
        for name, selected in groups:
            total = self.accelerator.gather(sums[selected].sum()).sum()
            count = self.accelerator.gather(counts[selected].sum()).sum()
            self._metrics[mode][name].append((total / count).item() if count > 0 else float("nan"))
