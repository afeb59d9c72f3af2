"""SD-Zero Phase 1, Self-Revision Training (SRT), from the command line: collect D_rev, then two SFT stages.

```bash
# Offline demo on single-digit additions with the embedded SmolLM2-135M-Instruct (CPU)
trl-sdx sdzero-srt --config examples/configs/sdzero_srt_demo.yaml

# The released recipe (every SRTConfig default: 3 y_init x 3 revisions, T 1.0, top-p 0.9, 16384 tokens, stop at 6000
# kept revisions, stage-2 quota 1000, max length 32768, 3 epochs, lr 5e-6 cosine); GPUs, vLLM and `math_problems`
trl-sdx sdzero-srt --config examples/configs/sdzero_srt.yaml --accelerate_config fsdp2 --num_processes 4
```

Outputs under `--output_dir`: `revisions/` (D_rev as `revisions.jsonl`, `counts.json`, `sft_split.json`),
`stage1_generation/`, `stage2_revision/` (theta_SRT, the start of Phase 2, with the control phrases it was trained
on in `sdzero_control_phrases.json`). Rerunning the same command skips the finished parts.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser

from trl_sdx.process_group import end_process_group
from trl_sdx.scripts.sdzero import SDZeroScriptArguments, load_datasets, model_init_kwargs
from trl_sdx.sdzero.srt import SRTConfig


def main(script_args: SDZeroScriptArguments, training_args: SRTConfig, model_args: ModelConfig):
    from trl import get_peft_config

    from trl_sdx.models import load_tokenizer, resolve_model_name_or_path
    from trl_sdx.sdzero.srt import run_srt

    if model_args.model_name_or_path is None:
        raise ValueError("`--model_name_or_path` (the model to teach self-revision) is required.")
    model_path = resolve_model_name_or_path(model_args.model_name_or_path)
    training_args.model_init_kwargs = {
        **model_init_kwargs(model_args, training_args.trust_remote_code, model_args.model_revision),
        **(training_args.model_init_kwargs or {}),
    }
    tokenizer = load_tokenizer(model_path, padding_side="left", trust_remote_code=training_args.trust_remote_code)
    dataset, _ = load_datasets(script_args, want_eval=False)
    final = run_srt(model_path, tokenizer, dataset, training_args, reward_funcs=script_args.reward_funcs,
                    peft_config=get_peft_config(model_args))
    print(f"theta_SRT saved to {final}. Phase 2: trl-sdx sdzero --model_name_or_path {final} "
          f"--teacher_model_name_or_path {final} ...")


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((SDZeroScriptArguments, SRTConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    end_process_group()  # every rank together: a live Gloo group can abort the exit
