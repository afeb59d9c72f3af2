"""MixSD knowledge injection in a plain Python script: copy it and swap in your model and facts.

Runs offline on a CPU (~10 minutes on 2 cores): SmolLM2-135M-Instruct learns 20 facts about fictional entities,
and the script reports memorisation (accuracy on those facts) and retention (accuracy on held-out probe questions,
relative to the base model) before and after training. For the paper's set-up see docs/mixsd.md.

    python examples/mixsd.py

In an existing TRL SFT script, the change is the two class names and a (question, answer) dataset:

    from trl import SFTConfig, SFTTrainer                    # before
    from trl_sdx.mixsd import MixSDConfig, MixSDTrainer      # after
"""

import torch

from trl_sdx.data import make_knowledge_dataset
from trl_sdx.mixsd import MixSDConfig, MixSDTrainer, evaluate_knowledge_injection
from trl_sdx.mixsd.targets import base_model_context
from trl_sdx.models import load_model, load_tokenizer

# Embedded model alias (resolved to a local folder, converted once). Any hub id or local path works too.
MODEL = "smollm2-135m-instruct"
on_gpu = torch.cuda.is_available()

tokenizer = load_tokenizer(MODEL)
model = load_model(MODEL, dtype=torch.float32)  # the targets are decoded in the training dtype

# Columns: `question` and `answer` (the gold answer turn, its final answer in \boxed{}). `probe` holds unrelated
# questions the model already answers, to measure what the injection breaks.
data = make_knowledge_dataset(n_entities=10, seed=0)
train_dataset, probe = data["train"], data["probe"]

args = MixSDConfig(
    output_dir="outputs/mixsd_example",
    # Target construction: the paper's λ and T; short targets and few retries for a CPU (paper: 8192 tokens, 100)
    lambda_mix=0.3,  # λ: each target token comes from π(·|question, y_<t) with prob. λ, else π(·|question+answer, y_<t)
    temperature=0.0,  # T = 0: argmax of the chosen conditional (T > 0: sample from the top-k=64 logits / T)
    max_new_tokens=40,  # a target cut off here is rejected
    max_retries=2,  # regenerate targets that fail (new coin flips), then drop them
    # The official rule ("boxed": the last \boxed{} equals the gold answer) keeps few facts on a 135M model that
    # rarely boxes; "lenient" also accepts the gold value as a word. Qwen3 and larger models: keep "boxed".
    answer_match="lenient",
    prompt_template="fact",  # the official fact-QA expert prompt; "reasoning" for solutions with a final answer
    # chat_template_kwargs={"enable_thinking": False} is the default: used for generation, SFT and evaluation alike
    generation_batch_size=20,
    # Training: plain SFT (completion-only NLL) of the targets given the question alone
    max_steps=30,
    per_device_train_batch_size=8,
    learning_rate=1e-4,
    lr_scheduler_type="constant_with_warmup",
    warmup_steps=3,
    weight_decay=0.01,
    adam_beta1=0.9,
    adam_beta2=0.95,
    logging_steps=10,
    bf16=on_gpu,
    use_cpu=not on_gpu,
    activation_checkpointing=False,
    save_strategy="no",  # no checkpoints / optimizer states; the final model is saved below
    report_to="none",
)

# Building the trainer builds the targets with the (still untrained) model and caches them under
# outputs/mixsd_example/mixsd_cache; a second run reuses them. With `peft_config=LoraConfig(...)` the targets come
# from the model before the adapters are attached.
trainer = MixSDTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer)
stats = trainer.mixsd_stats
print(f"targets: {stats['num_accepted']}/{stats['num_examples']} accepted, naive-token share "
      f"{stats['naive_token_share']:.2f}, mean retries {stats['mean_retries']:.2f}")
example = trainer.mixsd_targets
print(f"Q: {example.questions[0]}\n  gold:  {example.gold_answers[0]}\n  MixSD: {example.targets[0].completion}")

with base_model_context(trainer.model):
    base = evaluate_knowledge_injection(trainer.model, tokenizer, train_dataset, probe, max_new_tokens=32,
                                        disable_progress=False)
trainer.train()
after = evaluate_knowledge_injection(trainer.model, tokenizer, train_dataset, probe, max_new_tokens=32,
                                     base_probe_accuracy=base["probe_accuracy"], disable_progress=False)
print(f"memorisation {base['memorisation']:.2f} -> {after['memorisation']:.2f}; probe accuracy "
      f"{base['probe_accuracy']:.2f} -> {after['probe_accuracy']:.2f} (retention {after['retention']:.2f})")
trainer.save_model(args.output_dir)
