"""Configuration of `EntropyAwareGKDTrainer` (EOPD, arXiv 2603.07079)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import DistillationConfig

from ..precision import resolve_device_defaults
from ..validation import check_range, check_top_k


@dataclass
class EntropyAwareGKDConfig(DistillationConfig):
    r"""
    Configuration for [`EntropyAwareGKDTrainer`]: TRL's `DistillationConfig` plus the EOPD objective of
    "Entropy-Aware On-Policy Distillation of Language Models" (Jin et al., arXiv 2603.07079).

    Per completion token t of a student rollout y (π_T teacher, π_θ student, π_old the student at rollout time):

        L_t = max(-r_t A_t, -clip(r_t, 1-ε, 1+ε) A_t) + α · 1[H_t ≥ τ] · KL(π̃_T^{top-k} || π_θ)

    with A_t = log π_T(y_t) - log π_old(y_t), r_t = π_θ(y_t) / π_old(y_t) and H_t the teacher's entropy; the loss
    is summed over valid completion tokens and divided by their number.

    Rollout reuse follows GRPO's mechanism: one rollout (generation batch) of `generation_batch_size` prompts is
    sampled, split into `steps_per_generation` micro-batches and consumed `num_iterations` times, so the number of
    optimizer steps per rollout is `steps_per_generation * num_iterations / gradient_accumulation_steps`. The
    paper's 128 prompts per rollout with a mini-batch of 32 (4 optimizer steps) is `generation_batch_size=128` with
    `per_device_train_batch_size * num_processes * gradient_accumulation_steps = 32`.

    The default (`steps_per_generation=None` → `gradient_accumulation_steps`) is one optimizer step per rollout,
    exactly `DistillationTrainer`'s and `GRPOTrainer`'s default: swapping this trainer into a TRL script keeps the
    rollout size and cost the user configured. The PPO ratio is then 1 and the objective is the on-policy one; set
    `steps_per_generation` (or `generation_batch_size`) to reuse rollouts like the paper.

    `beta` (the generalized-JSD coefficient of `DistillationConfig`) is not used: the EOPD objective replaces it.
    """

    # EOPD objective
    tau: float = field(
        default=0.8,
        metadata={
            "help": "τ: entropy gate threshold in nats (paper 0.8). The forward-KL term is added on tokens whose "
            "teacher entropy H_t >= τ. `inf` disables the gate (plain OPD); 0 adds forward KL on every token."
        },
    )
    alpha: float = field(
        default=1.0,
        metadata={"help": "α: weight of the entropy-gated forward-KL term (paper 1.0). Must be >= 0."},
    )
    fkl_top_k: int | None = field(
        default=16,
        metadata={
            "help": "k: the forward KL runs over the teacher's k most likely tokens, renormalised (paper 16). "
            "`None` (or 0, for the command line) uses the full vocabulary."
        },
    )
    clip_eps: float = field(
        default=0.2,
        metadata={"help": "ε: PPO clip range of the ratio r_t = π_θ(y_t)/π_old(y_t) (paper 0.2). Must be in (0, 1)."},
    )
    rkl_estimator: str = field(
        default="sampled",
        metadata={
            "help": "Reverse-KL (OPD) term: 'sampled' = the paper's PPO-clipped sampled-token policy gradient with "
            "advantage A_t = log π_T(y_t) - log π_old(y_t); 'full' = exact reverse KL Σ_v π_θ log(π_θ/π_T) over the "
            "vocabulary (TRL's GKD beta=1; no ratio, no clipping).",
            "choices": ["sampled", "full"],
        },
    )

    # Rollout reuse (GRPO's names and semantics)
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts per rollout (paper: 128), across all processes. If `None`, it is "
            "`per_device_train_batch_size * num_processes * steps_per_generation`. Mutually exclusive with "
            "`steps_per_generation`."
        },
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={
            "help": "Micro-batches (forward/backward passes) each rollout is split into; a multiple of "
            "`gradient_accumulation_steps`. Optimizer steps per rollout = steps_per_generation * num_iterations / "
            "gradient_accumulation_steps (paper: 4). If `None`, it is `gradient_accumulation_steps` (one optimizer "
            "step per rollout, as in DistillationTrainer). π_old is recorded once per rollout."
        },
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "μ: passes over each rollout (PPO epochs, GRPO's `num_iterations`; paper 1)."},
    )

    # Prompts and the teacher's view of a completion
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest prompt accepted, in tokens (paper 1024). Longer prompts are an error naming the fix "
            "(filter the dataset), counted over the training set at construction (each rollout of a streamed one); "
            "nothing is truncated. `None`: no limit but the model's context."
        },
    )
    end_of_turn_mapping: str = field(
        default="auto",
        metadata={
            "help": "Base-model student, instruct teacher: before the teacher scores a completion, replace the "
            "student's end-of-turn token (its tokenizer's EOS, e.g. `<|endoftext|>`) with the teacher's (e.g. "
            "`<|im_end|>`), as the official code does; the student's own ids are unchanged. 'auto': on when both "
            "tokenizers are known and their EOS tokens differ (logged); 'on': required (error if it cannot apply); "
            "'off': never.",
            "choices": ["auto", "on", "off"],
        },
    )

    # Loss implementation
    use_fused_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the loss from the final hidden states and the lm_head weights, chunk by chunk, never "
            "materialising [tokens, vocab] logits for the batch. `False` runs both models' full forward and the "
            "plain loss (same value and gradient; needed for models with logit scaling or soft-capping)."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk of the fused loss and of the rollout-time teacher/π_old scoring (memory ~ "
            "chunk_size x vocab). `None` sizes it by the vocabulary so the chunk's temporaries stay within 1 GiB "
            "(256 rows at Qwen3's 151,936 tokens, 512 at SmolLM2's 49,152). Ignored by the plain path's loss."
        },
    )
    loss_compiled: str = field(
        default="auto",
        metadata={
            "help": "torch.compile the fused loss's per-chunk step (chunks padded to a few fixed shapes, so a "
            "changing token count does not recompile). 'auto' (default): on when training on a CUDA device, off "
            "elsewhere (compiling on CPU costs more than it saves); 'true' / 'false' force it.",
            "choices": ["auto", "true", "false"],
        },
    )

    def __post_init__(self):
        resolve_device_defaults(self)  # bf16 only where supported; current checkpointing name
        super().__post_init__()
        check_range("tau", self.tau, low=0.0, allow_inf=True)
        check_range("alpha", self.alpha, low=0.0)
        if self.fkl_top_k == 0:  # `--fkl_top_k 0`: the command line cannot spell None for an int field
            self.fkl_top_k = None
        check_top_k("fkl_top_k", self.fkl_top_k)
        check_range("clip_eps", self.clip_eps, low=0.0, high=1.0, low_open=True, high_open=True)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        if self.rkl_estimator not in ("sampled", "full"):
            raise ValueError(
                f"`rkl_estimator` must be 'sampled' (the paper's PPO-clipped estimator) or 'full' (exact reverse "
                f"KL over the vocabulary), got {self.rkl_estimator!r}."
            )
        if int(self.num_iterations) != self.num_iterations or self.num_iterations < 1:
            raise ValueError(f"`num_iterations` must be a positive integer, got {self.num_iterations}.")
        if self.loss_chunk_size is not None and (
                int(self.loss_chunk_size) != self.loss_chunk_size or self.loss_chunk_size < 1):
            raise ValueError(f"`loss_chunk_size` must be a positive integer or None (sized by the vocabulary), got "
                             f"{self.loss_chunk_size}.")
        if isinstance(self.loss_compiled, bool):  # Python callers may pass a bool
            self.loss_compiled = "true" if self.loss_compiled else "false"
        self.loss_compiled = str(self.loss_compiled).lower()
        if self.loss_compiled not in ("auto", "true", "false"):
            raise ValueError(f"`loss_compiled` must be 'auto', 'true' or 'false', got {self.loss_compiled!r}.")
        if self.max_prompt_length is not None and (int(self.max_prompt_length) != self.max_prompt_length
                                                   or self.max_prompt_length < 1):
            raise ValueError(f"`max_prompt_length` must be a positive integer or None, got {self.max_prompt_length}.")
        if self.end_of_turn_mapping not in ("auto", "on", "off"):
            raise ValueError(f"`end_of_turn_mapping` must be 'auto', 'on' or 'off', got {self.end_of_turn_mapping!r}.")
        self._resolve_rollout_size()

    def _resolve_rollout_size(self) -> None:
        """GRPO's rule: `generation_batch_size` and `steps_per_generation` determine each other."""
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "`generation_batch_size` and `steps_per_generation` cannot both be set: set the rollout size "
                "(`generation_batch_size`) or the number of micro-batches per rollout (`steps_per_generation`)."
            )
        if self.generation_batch_size is None and self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        elif self.steps_per_generation is None:
            if self.generation_batch_size <= 0 or self.generation_batch_size % global_batch != 0:
                raise ValueError(
                    f"`generation_batch_size` ({self.generation_batch_size}) must be a positive multiple of "
                    f"per_device_train_batch_size * num_processes ({global_batch})."
                )
            self.steps_per_generation = self.generation_batch_size // global_batch
        if int(self.steps_per_generation) != self.steps_per_generation or self.steps_per_generation < 1:
            raise ValueError(f"`steps_per_generation` must be a positive integer, got {self.steps_per_generation}.")
        if self.steps_per_generation % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"`steps_per_generation` ({self.steps_per_generation}) must be a multiple of "
                f"`gradient_accumulation_steps` ({self.gradient_accumulation_steps}) so every optimizer step uses "
                "micro-batches of a single rollout. Optimizer steps per rollout = steps_per_generation / "
                "gradient_accumulation_steps."
            )
        self.generation_batch_size = global_batch * self.steps_per_generation

    def resolve_loss_compiled(self, device) -> bool:
        """`loss_compiled` for a run on `device`: 'auto' is on exactly when that device is a CUDA GPU."""
        if self.loss_compiled == "auto":
            return torch.device(device).type == "cuda"
        return self.loss_compiled == "true"

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """Optimizer steps taken on each rollout (paper: 4); > 1 makes the PPO ratio and clipping matter."""
        return self.steps_per_generation * self.num_iterations // self.gradient_accumulation_steps
