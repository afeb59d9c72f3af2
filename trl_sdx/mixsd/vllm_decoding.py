"""MixSD targets with vLLM (optional, `pip install trl-sdx[vllm]`): one request per run of same-side steps.

The coins u_t are drawn before decoding (`draw_step_randomness`, the same draws as `mixed_generate`), so each
sequence's whole schedule of sides is known up front. At T = 0 a run of k consecutive steps on one side is k greedy
steps of that side's conditional on the growing mixed prefix: exactly what one greedy vLLM request of `max_tokens=k`
on `side prompt + y_<t` returns. A sequence therefore needs one request per run, about 1 + 2λ(1-λ)·L requests
(0.42·L at λ = 0.3) instead of the official one request per token, and vLLM's prefix caching reuses the prompt and
prefix KV across them. The output equals `mixed_generate`'s at T = 0 (up to ties in the argmax).

T > 0 is not offered here: vLLM's sampler would draw other samples than the pre-drawn inverse-CDF uniforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..vllm_engine import release_vllm_engine
from .mixed_decoding import MixedGenerationOutput, draw_step_randomness


def same_side_runs(from_naive: Sequence[bool]) -> list[tuple[bool, int]]:
    """Maximal runs of consecutive steps on the same side: `[(from_naive, length), ...]`, lengths summing to L."""
    runs: list[tuple[bool, int]] = []
    for side in from_naive:
        if runs and runs[-1][0] == side:
            runs[-1] = (side, runs[-1][1] + 1)
        else:
            runs.append((bool(side), 1))
    return runs


def greedy_sampling_params(max_tokens: int, stop_token_ids: Sequence[int]):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=list(stop_token_ids),
                          detokenize=False)


def vllm_mixed_generate(
    llm,
    naive_input_ids: Sequence[Sequence[int]],
    expert_input_ids: Sequence[Sequence[int]],
    *,
    lambda_mix: float = 0.3,
    max_new_tokens: int = 8192,
    stop_token_ids: Sequence[int] = (),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    sampling_params: Callable[[int, Sequence[int]], object] | None = None,
) -> MixedGenerationOutput:
    """Greedy (T = 0) mixed decoding on a `vllm.LLM`, one request per same-side run (see the module docstring).

    Each round sends one request per unfinished sequence (vLLM batches them): prompt = the run's side prompt plus
    the tokens generated so far, `max_tokens` = the run's length. A sequence ends on a stop token (kept) or when its
    schedule of `max_new_tokens` steps is used up. `sampling_params(max_tokens, stop_token_ids)` builds the
    request's parameters (greedy `vllm.SamplingParams` by default).
    """
    if len(naive_input_ids) != len(expert_input_ids):
        raise ValueError("`naive_input_ids` and `expert_input_ids` must have the same length.")
    sampling_params = sampling_params or greedy_sampling_params
    batch = len(naive_input_ids)
    coins, _ = draw_step_randomness(batch, max_new_tokens, 0.0, generator)
    plans = [same_side_runs((row < lambda_mix).tolist()) for row in coins]
    stops = set(stop_token_ids)
    sequences: list[list[int]] = [[] for _ in range(batch)]
    sources: list[list[bool]] = [[] for _ in range(batch)]
    next_run = [0] * batch
    active = list(range(batch))
    while active:
        prompts, params = [], []
        for i in active:
            side, length = plans[i][next_run[i]]
            prompt = naive_input_ids[i] if side else expert_input_ids[i]
            prompts.append({"prompt_token_ids": [*prompt, *sequences[i]]})
            params.append(sampling_params(length, sorted(stops)))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        still = []
        for i, output in zip(active, outputs, strict=True):
            side, length = plans[i][next_run[i]]
            tokens = list(output.outputs[0].token_ids)[:length]
            sequences[i].extend(tokens)
            sources[i].extend([side] * len(tokens))
            next_run[i] += 1
            ended = len(tokens) < length or (tokens and tokens[-1] in stops)
            if not ended and next_run[i] < len(plans[i]):
                still.append(i)
        active = still
    return MixedGenerationOutput(sequences, sources)


class VLLMTargetDecoder:
    """A `vllm.LLM` on the base model's path that decodes MixSD targets (`rejection_sample(decoder=...)`).

    Under several processes each builds its engine with vLLM's `external_launcher` backend (as TRL's colocate mode
    does) and decodes its own shard of the facts. `close()` frees the engine's GPU memory before training.
    """

    def __init__(self, model_path: str, *, seed: int, gpu_memory_utilization: float, max_model_len: int | None,
                 dtype: str = "auto", num_processes: int = 1):
        try:
            from vllm import LLM
        except ImportError as error:
            raise ValueError("`mixsd_use_vllm=True` needs vLLM: `pip install trl-sdx[vllm]`.") from error
        distributed = {"distributed_executor_backend": "external_launcher"} if num_processes > 1 else {}
        self.llm = LLM(model=model_path, seed=seed, dtype=dtype, enable_prefix_caching=True,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, **distributed)

    @classmethod
    def from_engine(cls, llm) -> VLLMTargetDecoder:
        """Wrap an engine you already have (anything with vLLM's `generate(prompts, params, use_tqdm=)`)."""
        decoder = cls.__new__(cls)
        decoder.llm = llm
        return decoder

    def __call__(self, naive_ids, expert_ids, *, lambda_mix, temperature, max_new_tokens, eos_token_id, generator,
                 **unused) -> MixedGenerationOutput:
        if temperature != 0:
            raise ValueError("vLLM targets are greedy (temperature 0); set `mixsd_use_vllm=False` for T > 0.")
        return vllm_mixed_generate(self.llm, naive_ids, expert_ids, lambda_mix=lambda_mix,
                                   max_new_tokens=max_new_tokens, stop_token_ids=eos_token_id, generator=generator)

    def close(self) -> None:
        release_vllm_engine(self)
