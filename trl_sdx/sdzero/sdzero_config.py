"""Configuration of `SDZeroTrainer` (Self-Distillation Zero, Phase 2, arXiv 2604.12002)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DistillationConfig

from trl_sdx.precision import resolve_device_defaults
from trl_sdx.validation import check_range, check_top_k

from trl_sdx.sdzero.control_phrases import CORRECT_PHRASE, INCORRECT_PHRASE  # noqa: F401 (re-exported)
TEACHER_MODES = ("auto", "separate", "copy", "disable_adapter")
KL_TYPES = ("forward", "reverse", "mixed")


@dataclass
class SDZeroConfig(DistillationConfig):
    r"""
    Configuration for [`SDZeroTrainer`]: on-policy self-distillation from a reward-conditioned reviser.

    Per prompt x the student samples one y, a reward function grades it (r in {0, 1}), and the teacher reads
    `chat(x) + y + "\n\n" + P_r + "\n\n" + y`; the student matches the teacher's distributions on the second copy of
    y under a top-k mixed KL. Everything of [`~trl.DistillationConfig`] applies (generation, vLLM, logging), except
    `beta`, which SD-Zero replaces by `kl_type` / `mixed_kl_weight`. `temperature` is both the sampling and the loss
    temperature, as in TRL's `DistillationTrainer` (the paper uses 1.0 for both).

    Paper/code defaults that differ from `DistillationConfig`: `learning_rate=5e-6` (paper; the released config uses
    1e-5), `max_grad_norm=1.0`, top-k support 64, mixed KL with w = 0.5.
    """

    learning_rate: float = field(
        default=5e-6,
        metadata={"help": "Initial AdamW learning rate. The paper reports 5e-6 (its released config uses 1e-5)."},
    )

    # Control phrases P_r (spec: "Control phrases")
    correct_phrase: str | None = field(
        default=None,
        metadata={
            "help": "P_1, the control phrase after a correct y (r = 1), inserted as '\\n\\n' + P_1 + '\\n\\n'. None "
            "(default) = the phrase Phase 1 saved with theta_SRT (`sdzero_control_phrases.json` in the teacher's, "
            "else the student's folder), else the released 'Let me rephrase the above solution.'."
        },
    )
    incorrect_phrase: str | None = field(
        default=None,
        metadata={
            "help": "P_0, the control phrase after an incorrect y (r = 0). None (default) = Phase 1's saved phrase, "
            "else the released 'Wait, this response is wrong. Let me correct it.' (the released OLMo runs use "
            "'Wrong. I need to redo all.'; the paper v1 prints 'Wait, this response is not correct, let me start "
            "over.'). A value that differs from Phase 1's saved one is warned about."
        },
    )

    # Reward r
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Weights of the reward functions (like GRPO); None = all 1. Their weighted sum is "
                          "thresholded by `reward_threshold`."},
    )
    reward_threshold: float = field(
        default=0.5,
        metadata={
            "help": "r = 1 when the weighted reward is >= this value, else r = 0 (the released code uses r > 0.5 on "
            "a 0/1 math-verify reward)."
        },
    )

    # Teacher
    teacher_mode: str = field(
        default="auto",
        metadata={
            "help": "Where the teacher pi_{theta_SRT} comes from. 'separate': a frozen model given as `teacher_model` "
            "or `teacher_model_name_or_path` (the paper's setting: a second copy of theta_SRT). 'copy': a frozen copy "
            "of the initial student. 'disable_adapter': the training model itself with its LoRA adapters disabled "
            "(one copy of the weights; needs `peft_config`). 'auto': 'separate' if a teacher is given, else "
            "'disable_adapter' with PEFT, else 'copy'."
        },
    )
    teacher_sync_steps: int = field(
        default=0,
        metadata={
            "help": "Hard-copy the student into the teacher every this many optimizer steps (the paper's iterative "
            "self-evolution, e.g. after ~400 steps). 0 = never (released default). With 'disable_adapter' the LoRA "
            "update is merged into the base weights and reset, which leaves the student unchanged."
        },
    )
    teacher_max_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum teacher input length for the truncation rule: if |x| + 2|y| + |delim| exceeds it, y is "
            "cut to (max - |x| - |delim|) // 2 tokens for student and teacher; <= 0 gives the sample zero weight "
            "(released config: 32768). None = the teacher's `max_position_embeddings`."
        },
    )
    keep_eos_in_first_copy: bool = field(
        default=True,
        metadata={
            "help": "Keep y's end-of-turn token in the FIRST copy of y in the teacher input (default True: the spec's "
            "token-level layout chat(x) + y + delim + y, as the released code concatenates the generated ids). False "
            "drops it, matching Phase 1's 'y_init + delim' text on which the reviser was trained."
        },
    )

    # Loss (spec: top-k KL)
    distillation_topk: int | None = field(
        default=64,
        metadata={"help": "k, the size of the teacher's top-k support S_t (paper: 64). None = full vocabulary."},
    )
    kl_type: str = field(
        default="mixed",
        metadata={
            "help": "'forward', 'reverse' (the paper's Eq. 4) or 'mixed' (released default): w FKL + (1 - w) RKL, both "
            "renormalised over S_t."
        },
    )
    mixed_kl_weight: float = field(
        default=0.5,
        metadata={"help": "w, the forward-KL weight of the mixed KL (released default 0.5)."},
    )
    use_fused_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss from the final hidden states and the lm_head weights chunk by chunk, never "
            "materialising [B, T, V] logits. False = plain path on full logits (same value)."
        },
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={"help": "Tokens per chunk of the fused loss."},
    )
    loss_implementation: str = field(
        default="auto",
        metadata={
            "help": "Chunked kernel of the fused top-k KL: 'native' (trl_sdx.losses.fused_topk_distillation_loss), "
            "'liger' (the same loss on Liger's LigerFusedLinearDistillationBase, eager) or 'auto' (the one measured "
            "faster on this device type in benchmarks/loss_kernels.py: native on CPU; native on CUDA until measured). "
            "Same value and gradients. Only used with use_fused_loss=True.",
            "choices": ["auto", "liger", "native"],
        },
    )

    def __post_init__(self):
        resolve_device_defaults(self)  # bf16 only where supported; current checkpointing name
        super().__post_init__()
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"`teacher_mode` must be one of {TEACHER_MODES}, got {self.teacher_mode!r}.")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"`kl_type` must be one of {KL_TYPES}, got {self.kl_type!r}.")
        check_range("mixed_kl_weight", self.mixed_kl_weight, low=0.0, high=1.0)
        check_top_k("distillation_topk", self.distillation_topk)
        if int(self.teacher_sync_steps) != self.teacher_sync_steps or self.teacher_sync_steps < 0:
            raise ValueError(
                f"`teacher_sync_steps` must be an integer >= 0 (0 = never), got {self.teacher_sync_steps}."
            )
        if self.teacher_max_length is not None and self.teacher_max_length <= 0:
            raise ValueError(f"`teacher_max_length` must be positive or None, got {self.teacher_max_length}.")
        if self.loss_chunk_size <= 0:
            raise ValueError(f"`loss_chunk_size` must be positive, got {self.loss_chunk_size}.")
        if self.loss_implementation not in ("auto", "liger", "native"):
            raise ValueError(
                f"`loss_implementation` must be 'auto', 'liger' or 'native', got {self.loss_implementation!r}."
            )
        for name in ("correct_phrase", "incorrect_phrase"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"`{name}` must be a non-empty string, or None for Phase 1's saved phrase.")
        if self.correct_phrase is not None and self.correct_phrase == self.incorrect_phrase:
            raise ValueError(
                "`correct_phrase` and `incorrect_phrase` are equal: the teacher could not tell r = 1 from r = 0."
            )
