"""Configuration of `MixSDTrainer` (MixSD, arXiv 2605.16865)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from trl import SFTConfig

from ..precision import resolve_device_defaults
from ..validation import check_range, check_top_k
from .prompts import resolve_template

ANSWER_MATCHES = ("boxed", "boxed_or_last_number", "lenient")


@dataclass
class MixSDConfig(SFTConfig):
    r"""
    Configuration for [`MixSDTrainer`]: TRL's `SFTConfig` plus the target construction of "MixSD: Mixed Contextual
    Self-Distillation for Knowledge Injection" (arXiv 2605.16865).

    Before training, the frozen base model π turns every (question, gold answer y*) row into a mixed target y:

        y_t from π(· | x⁻, y_<t) if u_t < λ else π(· | x⁺, y_<t),   u_t ~ U(0, 1)

    with x⁻ = chat(user=question) and x⁺ = chat(user=question + PREFIX + "\n" + y*.strip() + TRANSITION); greedy at
    T = 0, else sampled from softmax(top-k logits / T). Targets that are cut off or whose answer does not match y*'s
    (official rule: the last \boxed{} equals y*'s exactly) are regenerated up to `max_retries` times. Training is
    then plain completion-only SFT of y given x⁻, rendered with the same `chat_template_kwargs` as generation.

    The paper's training set-up (constant lr after 20 warm-up steps, lr 1e-5, AdamW wd 0.01, betas (0.9, 0.95),
    global batch 16) is set through the usual `SFTConfig` fields.
    """

    # Mixed decoding
    lambda_mix: float = field(
        default=0.3,
        metadata={
            "help": "λ: probability of taking each target token from the naive conditional π(·|x⁻, y_<t) instead of "
            "the expert one π(·|x⁺, y_<t) (paper 0.3; 0.3-0.5 good, 0.7 under-memorises). 0 is greedy decoding of "
            "the expert prompt (the OPSD-NLL baseline), 1 greedy decoding of the question alone. In [0, 1]."
        },
    )
    temperature: float = field(
        default=0.0,
        metadata={
            "help": "T: decoding temperature of the mixed targets (paper 0). 0 takes the argmax of the chosen "
            "conditional; T > 0 samples from softmax(top-k logits / T)."
        },
    )
    top_k: int = field(
        default=64,
        metadata={"help": "k: number of highest logits kept when sampling at T > 0 (paper 64). At most the vocab."},
    )
    max_new_tokens: int = field(
        default=8192,
        metadata={
            "help": "Maximum length of a mixed target in tokens (official 8192). Generation stops earlier at EOS or "
            "end-of-turn; a target cut off here fails rejection sampling."
        },
    )
    max_retries: int = field(
        default=100,
        metadata={
            "help": "Rejection sampling: a target that is cut off or whose answer differs from the gold one is "
            "regenerated with new coin flips up to this many extra times (official 100). 0 disables retries; they "
            "are skipped anyway when they cannot differ (T = 0 with λ = 0 or 1)."
        },
    )
    answer_match: str = field(
        default="boxed",
        metadata={
            "help": "How rejection sampling grades a target against the gold answer turn y*: 'boxed' (official "
            "fact-QA rule: the last \\boxed{} content, stripped, equals y*'s exactly; no box fails), "
            "'boxed_or_last_number' (official digit-operations rule: last \\boxed{}, else last number, compared "
            "as numbers) or 'lenient' (ours: math-verify final answer, or y*'s answer as a whole word; for small "
            "models on free-form facts). A trainer `answer_checker` callable overrides it.",
            "choices": ["boxed", "boxed_or_last_number", "lenient"],
        },
    )
    chat_template_kwargs: dict | str | None = field(
        default_factory=lambda: {"enable_thinking": False},
        metadata={
            "help": "Keyword arguments of `apply_chat_template`, used alike for target generation, SFT rendering "
            "and evaluation (official: enable_thinking=False, so a hybrid-thinking model such as Qwen3 answers "
            "without a think block). A JSON string on the command line. Templates ignore keywords they do not use."
        },
    )
    keep_failed: bool = field(
        default=False,
        metadata={
            "help": "Keep the targets that never matched the gold answer (default: drop them, as the paper does; "
            "the number dropped is logged and saved in the cache metadata)."
        },
    )
    generation_batch_size: int = field(
        default=16,
        metadata={"help": "Number of sequences decoded together while building the targets."},
    )
    mixsd_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the coin flips u_t (and samples at T > 0). Each example draws from its own generator "
            "derived from it, so targets do not depend on `generation_batch_size`. Defaults to `seed`."
        },
    )
    mixsd_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the target cache, keyed by a hash of base model weights, data and mixing parameters: "
            "a rerun with the same inputs reuses the targets instead of regenerating them. Defaults to "
            "`<output_dir>/mixsd_cache`."
        },
    )
    mixsd_use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Build the targets with vLLM (`pip install trl-sdx[vllm]`, temperature 0 only): one greedy "
            "request per run of same-side steps (about 0.4·L requests per target at λ = 0.3 instead of the "
            "official L), same tokens as the KV-cache decoder. vLLM loads the weights from the model's path."
        },
    )
    mixsd_vllm_gpu_memory_utilization: float = field(
        default=0.5,
        metadata={"help": "vLLM's `gpu_memory_utilization` while building targets (the engine is freed before SFT)."},
    )
    mixsd_vllm_max_model_len: int | None = field(
        default=10000,
        metadata={"help": "vLLM's `max_model_len` while building targets (official 10000; None: the model's)."},
    )
    mixsd_targets_path: str | None = field(
        default=None,
        metadata={
            "help": "A cache entry folder built beforehand (e.g. by `trl-sdx mixsd --generate_only`): train on its "
            "targets without decoding. For DeepSpeed ZeRO-3 / FSDP CPU-RAM-efficient loading, whose sharded weights "
            "cannot decode; the entry must match this run's data and mixing parameters."
        },
    )

    # Prompts
    prompt_template: str = field(
        default="fact",
        metadata={
            "help": "Expert prompt x⁺ strings: 'fact' (official KGFact: '...new knowledge base. Here is the answer "
            "to this question:' / 'Now answer the question within \\boxed{}'), 'reasoning' (official KGFunc/SimpleQA: "
            "'Here is a reference solution...' / 'After understanding the reference solution...'), or 'custom' "
            "(set `expert_prefix` and `expert_transition`).",
            "choices": ["fact", "reasoning", "custom"],
        },
    )
    expert_prefix: str | None = field(
        default=None,
        metadata={
            "help": "PREFIX of x⁺ = question + PREFIX + '\\n' + y*.strip() + TRANSITION; overrides the template."
        },
    )
    expert_transition: str | None = field(
        default=None,
        metadata={"help": "TRANSITION of x⁺ (see `expert_prefix`); overrides the template."},
    )

    # Dataset columns
    question_column: str = field(
        default="question",
        metadata={"help": "Column of the training set holding the question (the user turn of x⁻)."},
    )
    answer_column: str = field(
        default="answer",
        metadata={"help": "Column holding the gold answer turn y* (its final answer is read for rejection sampling)."},
    )

    def __post_init__(self):
        resolve_device_defaults(self)  # bf16 only where supported; current checkpointing name
        super().__post_init__()
        check_range("lambda_mix", self.lambda_mix, low=0.0, high=1.0)
        check_range("temperature", self.temperature, low=0.0)
        check_top_k("top_k", self.top_k)
        if self.max_new_tokens is None or int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be a positive integer, got {self.max_new_tokens}.")
        if self.max_retries is None or int(self.max_retries) != self.max_retries or self.max_retries < 0:
            raise ValueError(f"`max_retries` must be an integer >= 0 (0 disables retries), got {self.max_retries}.")
        if self.generation_batch_size < 1:
            raise ValueError(f"`generation_batch_size` must be >= 1, got {self.generation_batch_size}.")
        resolve_template(self.prompt_template, self.expert_prefix, self.expert_transition)
        if self.answer_match not in ANSWER_MATCHES:
            raise ValueError(f"`answer_match` must be one of {list(ANSWER_MATCHES)}, got {self.answer_match!r}.")
        if self.mixsd_use_vllm and self.temperature != 0:
            raise ValueError("`mixsd_use_vllm=True` builds greedy targets only: set `temperature=0` (the paper's) or "
                             "`mixsd_use_vllm=False` to sample with the KV-cache decoder.")
        if isinstance(self.chat_template_kwargs, str):  # from the command line
            self.chat_template_kwargs = json.loads(self.chat_template_kwargs)
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, dict):
            raise ValueError(
                f"`chat_template_kwargs` must be a dict (or its JSON string), got {self.chat_template_kwargs!r}."
            )
