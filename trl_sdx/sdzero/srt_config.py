"""Configuration of SD-Zero Phase 1, Self-Revision Training (`run_srt`, CLI `trl-sdx sdzero-srt`).

Defaults are the released recipe (spec, "Phase 1"), read from the official scripts: collection with T = 1.0,
top-p 0.9, 3 y_init x 3 revisions, 16384 new tokens, the stop strings, the 6000-revision stop and the math system
prompts; SFT with max length 32768, 3 epochs, lr 5e-6 cosine, warmup 0.05, weight decay 1e-4, betas (0.9, 0.95).
Small values for CPU demos live in `examples/configs/sdzero_srt_demo.yaml`, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from trl_sdx.precision import resolve_device_defaults
from trl_sdx.sdzero.control_phrases import CORRECT_PHRASE, INCORRECT_PHRASE

SRT_STAGES = ("generation", "revision")
LONG_ROW_POLICIES = ("drop", "error")
COLLECTION_SYSTEM_PROMPT = "You are a helpful assistant that solves math problems step by step."
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STOP_STRINGS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "Question:")


@dataclass
class SRTConfig(SFTConfig):
    r"""
    Configuration of SD-Zero Phase 1 (`run_srt`): revision collection, the two SFT sets, then SFT.

    The `SFTConfig` fields drive BOTH SFT stages; `output_dir` is the root holding `revisions/`,
    `stage1_generation/` and `stage2_revision/` (theta_SRT).
    """

    # ---- SFT (both stages), the released `scripts/sft.sh`
    learning_rate: float = field(default=5e-6, metadata={"help": "SFT learning rate of both stages (released: 5e-6)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "SFT epochs of each stage (released: 3)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "SFT schedule (released: cosine)."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup; a float in [0, 1) is a ratio (released: "
                                                                 "warmup ratio 0.05)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (released: 1e-4)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (released: betas (0.9, 0.95))."})
    max_length: int | None = field(
        default=32768,
        metadata={
            "help": "Longest SFT row in tokens (released: 32768). A row longer than this is never cut: it is dropped "
            "and counted, or raises, per `long_rows`. None = no limit."
        },
    )
    long_rows: str = field(
        default="drop",
        metadata={"help": "What happens to an SFT row longer than `max_length`: 'drop' (counted, logged and recorded "
                          "in the stage's SRT_DONE.json) or 'error'."},
    )

    # ---- Collection of D_rev, the released `self_critique_pipeline.py` / `scripts/run_srt_data.sh`
    num_init_samples: int = field(default=3, metadata={"help": "y_init samples per problem x (released: 3)."})
    num_revisions: int = field(
        default=3, metadata={"help": "y_revised samples per revised y_init; each verified-correct one is kept "
                                     "(released: 3)."}
    )
    revise_correct: bool = field(
        default=False,
        metadata={
            "help": "Also rephrase correct y_init (with P_1), as the paper describes. Default False: the released "
            "code revises only incorrect y_init (with P_0)."
        },
    )
    correct_phrase: str = field(default=CORRECT_PHRASE, metadata={"help": "P_1, the control phrase after a correct y."})
    incorrect_phrase: str = field(
        default=INCORRECT_PHRASE,
        metadata={"help": "P_0, the control phrase after an incorrect y. The released OLMo runs use 'Wrong. I need to "
                          "redo all.' (`trl_sdx.sdzero.OLMO_INCORRECT_PHRASE`). Saved with theta_SRT for Phase 2."},
    )
    reward_threshold: float = field(
        default=0.5, metadata={"help": "r = 1 when the weighted reward of a response is >= this value."}
    )
    init_max_new_tokens: int = field(default=16384, metadata={"help": "Token budget of y_init (released: 16384)."})
    revision_max_new_tokens: int = field(
        default=16384, metadata={"help": "Token budget of y_revised (released: 16384)."}
    )
    sampling_temperature: float = field(default=1.0, metadata={"help": "Collection temperature (released: 1.0)."})
    sampling_top_p: float = field(default=0.9, metadata={"help": "Collection top-p (released: 0.9)."})
    stop_strings: list[str] = field(
        default_factory=lambda: list(STOP_STRINGS),
        metadata={"help": "Collection stops a sample at any of these strings, which are not kept (released: "
                          "<|im_end|>, <|endoftext|>, <|im_start|>, Question:)."},
    )
    max_revisions: int | None = field(
        default=6000,
        metadata={
            "help": "Collection stops once this many verified revisions are kept, and keeps the first this many in "
            "problem order (released: 6000). None = go through the whole dataset."
        },
    )
    collection_system_prompt: str | None = field(
        default=COLLECTION_SYSTEM_PROMPT,
        metadata={"help": "System turn added to conversational prompts without one, for sampling y_init and "
                          "y_revised (released math prompt). None = none."},
    )
    collection_prompt_suffix: str = field(
        default="\n\n" + BOXED_INSTRUCTION,
        metadata={"help": "Appended to the last user turn (or a plain-text prompt) for sampling (released: '\\n\\n' + "
                          "'Please reason step by step, and put your final answer within \\boxed{}.')."},
    )
    collection_batch_size: int = field(
        default=64,
        metadata={"help": "Problems per collection step (released: 64): the unit that is seeded, sharded across "
                          "processes and checked against `max_revisions`."},
    )
    generate_batch_size: int = field(
        default=16, metadata={"help": "Sequences per `model.generate` call (transformers backend only)."}
    )
    use_vllm_collection: bool = field(
        default=False,
        metadata={"help": "Sample the collection with vLLM (`vllm.LLM`, needs `pip install vllm` and a model path)."},
    )
    vllm_max_model_len: int = field(default=32768, metadata={"help": "vLLM `max_model_len` (released: 32768)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "vLLM `gpu_memory_utilization` (released: 0.9); freed before SFT starts."}
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "vLLM `tensor_parallel_size`; under a multi-process launch each group of this "
                                     "many processes shares one engine (must divide the number of processes)."}
    )

    # ---- The two SFT sets, the released `prepare_data.py` / `sft/sft.py`
    clean_revisions: bool = field(
        default=True,
        metadata={"help": "Trim repeating tails of y_init and y_revised, and strip sycophantic openings ('You're "
                          "absolutely right ...', 'Thank you for ...') from y_revised (released default: on)."},
    )
    stage2_size: int = field(
        default=1000,
        metadata={"help": "Quota of the stage-2 (revision) set (released: 1000): correct-init tuples first, then "
                          "incorrect-init ones; stage 1 takes every remaining incorrect-init tuple."},
    )
    sft_system_prompt: str | None = field(
        default=BOXED_INSTRUCTION,
        metadata={"help": "System turn of the SFT prompts, added to conversational prompts without one (released: "
                          "'Please reason step by step, and put your final answer within \\boxed{}.'). None = none."},
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
                     "collection_batch_size", "generate_batch_size", "stage2_size", "vllm_tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.max_revisions is not None and self.max_revisions < 1:
            raise ValueError(f"`max_revisions` must be >= 1 or None, got {self.max_revisions}.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"`max_length` must be >= 1 or None, got {self.max_length}.")
        if self.long_rows not in LONG_ROW_POLICIES:
            raise ValueError(f"`long_rows` must be one of {LONG_ROW_POLICIES}, got {self.long_rows!r}.")
        if self.packing:
            raise ValueError("`packing=True` is not supported by SRT: the released recipe trains unpacked rows, and "
                             "packing would cut rows at `max_length`. Set `packing=False`.")
        if self.correct_phrase == self.incorrect_phrase:
            raise ValueError("`correct_phrase` and `incorrect_phrase` must differ.")
