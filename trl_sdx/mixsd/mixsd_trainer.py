"""`MixSDTrainer`: knowledge injection by SFT on targets the frozen base model writes itself (arXiv 2605.16865).

The trainer only changes what is trained on. At construction, the (question, gold answer) training set is
turned into mixed targets by the base model (`build_mixsd_targets`: mixed decoding + rejection sampling, cached
on disk); the result is a conversational prompt/completion dataset that `SFTTrainer` trains on with its own
completion-only NLL. Model loading, PEFT, collation, loss, logging and checkpointing are all SFTTrainer's.
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path

from ..callbacks import RunArtifactsMixin
from ..liger import check_liger_kernel_usable
from ..models import load_tokenizer, resolve_model_name_or_path
from ..validation import check_columns, check_tokenizer, check_top_k
from .mixsd_config import MixSDConfig
from .rejection import AnswerChecker
from .targets import MixSDTargets, build_mixsd_targets, check_full_weights, gold_sft_dataset


class MixSDTrainer(RunArtifactsMixin, SFTTrainer):
    """SFT on MixSD targets: y built token by token from the naive π(·|x⁻, y_<t) and expert π(·|x⁺, y_<t)
    conditionals of the frozen base model, trained as completion-only NLL of y given x⁻.

    Args:
        model: model id/path (aliases such as `smollm2-135m-instruct` are resolved), a `PreTrainedModel`, or a
            `PeftModel` (its adapters are disabled while the targets are built). The base model that writes the
            targets is the initial weights: with `peft_config`, the model before the adapters are added.
        args: a `MixSDConfig`.
        train_dataset: rows with `args.question_column` and `args.answer_column` (the gold answer turn y*).
        eval_dataset: either rows in the same (question, answer) format, evaluated as the NLL of the gold answer
            given the question, or any dataset `SFTTrainer` accepts.
        processing_class: the tokenizer (needs a chat template and a pad token); loaded from `model` when None.
        answer_checker: `checker(completion_text, gold_answer_text) -> bool` for rejection sampling; defaults to
            the rule `args.answer_match` names (official fact QA: the last \\boxed{} equals the gold one exactly).
            A target cut off by `max_new_tokens` fails before the checker is asked.
        peft_config, data_collator, callbacks, optimizers, **kwargs: as for `SFTTrainer`.

    After construction, `trainer.mixsd_targets` holds the targets and `trainer.mixsd_stats` the naive-token share,
    retries per example and dropped count (also saved in the cache entry's `metadata.json`).
    """

    _tag_names = ["trl", "sft", "mixsd"]
    _name = "MixSD"
    _plot_metrics = ("loss", "mean_token_accuracy")
    _paper = {  # the model card's method line and citation (TRL's hook)
        "title": "MixSD: Mixed Contextual Self-Distillation for Knowledge Injection",
        "id": "2605.16865",
        "citation": "@article{mixsd2026,\n    title  = {{MixSD: Mixed Contextual Self-Distillation for Knowledge "
        "Injection}},\n    year   = 2026,\n    eprint = {arXiv:2605.16865}\n}",
    }

    def _plot_notes(self) -> dict[str, float]:
        return {"naive token share": self.mixsd_stats["naive_token_share"]}

    def __init__(
        self,
        model,
        args: MixSDConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        answer_checker: AnswerChecker | None = None,
        quantization_config=None,
        **kwargs,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = MixSDConfig(f"{str(name).rstrip('/').split('/')[-1]}-MixSD")
        elif not isinstance(args, MixSDConfig):
            raise ValueError(
                f"`args` must be a `MixSDConfig` (got {type(args).__name__}); it carries the mixing parameters "
                "(lambda_mix, temperature, top_k, max_retries, ...)."
            )
        # `use_liger_kernel`: SFTTrainer (at `train()`) applies Liger's model kernels; fail here without CUDA
        check_liger_kernel_usable(args)
        if train_dataset is not None and not isinstance(train_dataset, Dataset):
            raise ValueError(
                f"`train_dataset` must be a `datasets.Dataset` (got {type(train_dataset).__name__}): MixSD builds "
                "every target before training. Materialise a streaming dataset first, e.g. "
                "`Dataset.from_list(list(iterable_dataset))`."
            )
        check_columns(
            train_dataset, [args.question_column, args.answer_column], argument="train_dataset",
            hint="MixSD needs the question and its gold answer turn; set `question_column` / `answer_column` in "
            "MixSDConfig to your column names.",
        )
        if isinstance(model, str):
            model = self._load_model(model, args, quantization_config)
        if processing_class is None:  # like SFTTrainer: the model's own tokenizer, EOS as pad when it has none
            processing_class = load_tokenizer(model.config._name_or_path, trust_remote_code=args.trust_remote_code)
        check_tokenizer(processing_class, argument="processing_class", need_chat_template=True)
        check_top_k("top_k", args.top_k, model.config.get_text_config().vocab_size)

        # Targets are written by the base weights before any adapter is attached; the Trainer moves the model to
        # the device later, so move it now to decode there (no-op on CPU and for dispatched models).
        # With a prebuilt `mixsd_targets_path` nothing is decoded (and ZeRO-3 / meta weights stay untouched).
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if not args.mixsd_targets_path:
            check_full_weights(model)
            if getattr(model, "hf_device_map", None) is None and not quantized:
                model.to(args.device)
        # Every process builds its shard of the targets (no rank waits at a barrier while another decodes).
        self.mixsd_targets: MixSDTargets = build_mixsd_targets(
            model, processing_class, train_dataset, args, answer_checker=answer_checker
        )
        self.mixsd_stats = self.mixsd_targets.stats
        mixed_dataset = self.mixsd_targets.to_sft_dataset(args.keep_failed, args.chat_template_kwargs)
        if len(mixed_dataset) == 0:
            raise ValueError(
                f"No MixSD target matched its gold answer ({self.mixsd_stats['num_examples']} examples, "
                f"max_retries={args.max_retries}), so there is nothing to train on. Raise `max_retries`, "
                "`max_new_tokens` or `temperature`, check `answer_column` holds the gold answer turn (with a "
                "\\boxed{} or number the checker can read), or set `keep_failed=True`."
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=mixed_dataset,
            eval_dataset=self._convert_eval_dataset(eval_dataset, args),
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )

    @staticmethod
    def _load_model(model_id: str, args: MixSDConfig, quantization_config):
        """Load a model id the way SFTTrainer would, so the targets can be built before SFTTrainer wraps it."""
        model_init_kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            model_init_kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            model_init_kwargs["device_map"] = None
        model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        model = create_model_from_path(resolve_model_name_or_path(model_id), **model_init_kwargs)
        # Already applied: SFTTrainer would otherwise warn that they are ignored for an instantiated model.
        args.model_init_kwargs = None
        return model

    @staticmethod
    def _convert_eval_dataset(eval_dataset, args: MixSDConfig):
        """(question, answer) eval rows become gold prompt/completion rows; anything else goes to SFT unchanged."""

        def convert(dataset):
            columns = getattr(dataset, "column_names", None) or []
            if args.question_column in columns and args.answer_column in columns and "prompt" not in columns:
                return gold_sft_dataset(dataset, args.question_column, args.answer_column, args.chat_template_kwargs)
            return dataset

        if eval_dataset is None:
            return None
        if isinstance(eval_dataset, dict):
            return {name: convert(dataset) for name, dataset in eval_dataset.items()}
        return convert(eval_dataset)
