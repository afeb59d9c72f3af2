"""SD-Zero Phase 1, Self-Revision Training (SRT), from the command line: collect D_rev, then two SFT stages.

```bash
# Offline demo on synthetic arithmetic with the embedded SmolLM2-135M-Instruct
trl-sdx sdzero-srt --config examples/configs/sdzero_srt.yaml

# The paper's recipe (collection: 1 y_init per problem, keep verified revisions; SFT: 3 epochs, lr 5e-6, cosine)
trl-sdx sdzero-srt \
    --model_name_or_path Qwen/Qwen3-4B-Instruct-2507 --dataset_name my/math-with-answers \
    --num_init_samples 1 --num_revisions 4 --revise_correct --init_max_new_tokens 8192 --revision_max_new_tokens 8192 \
    --use_vllm_collection --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --output_dir outputs/srt
```

Outputs under `--output_dir`: `revisions/` (D_rev as `revisions.jsonl` + `counts.json`), `stage1_generation/`,
`stage2_revision/` (theta_SRT, the start of Phase 2). Rerunning the same command skips the finished parts.
"""

from __future__ import annotations

from trl import ModelConfig, TrlParser

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
