"""What every GPU-suite worker shares: the model shapes, the synthetic tokenizer and prompts, and how time and
memory are measured (CUDA: synchronised wall time and the allocator's peak; CPU: wall time and the peak RSS).

No weights are downloaded: models are randomly initialised from the Qwen3 configs below (speed and memory do not
depend on the weights). The tokenizer is a word-level one with exactly the model's vocabulary, so every id a random
model samples decodes to a word and encodes back to the same id (MixSD and SFT go through text), and every prompt has
an exact, chosen token length.
"""

from __future__ import annotations

import gc
import os
import re
import time

import torch

# Qwen3 shapes, from the released config.json files (vocabulary 151,936, head_dim 128, RoPE theta 1e6).
QWEN3 = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
}
QWEN3_COMMON = dict(vocab_size=151936, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False)
# --tiny (CPU): the same architecture at toy width and depth, student narrower than teacher as on the GPU.
TINY = {
    "0.6B": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.7B": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "8B": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, tie_word_embeddings=False),
}
TINY_COMMON = dict(vocab_size=512, head_dim=16, max_position_embeddings=1024, rope_theta=1000000.0,
                   rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<unk>"]


def shape(name: str, tiny: bool) -> dict:
    """The config dict of a Qwen3 size ("0.6B", "1.7B", "8B"), toy-sized under --tiny."""
    return {**(TINY_COMMON if tiny else QWEN3_COMMON), **(TINY if tiny else QWEN3)[name]}


def make_tokenizer(vocab_size: int):
    """Word-level tokenizer with exactly `vocab_size` ids: the special tokens, then words `w0`, `w1`, ...

    ChatML template (as Qwen's), EOS = <|im_end|>, pad = <pad>, left padding (as the trainers generate)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trl_sdx.testing import CHATML_TEMPLATE

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                        unk_token="<unk>", bos_token=None)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def make_model(name: str, tiny: bool, tokenizer, device, dtype, seed: int = 0):
    """A randomly initialised Qwen3ForCausalLM of size `name`, built directly on `device` in `dtype`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape(name, tiny), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype`: no fp32 copy of an 8B-shaped model first
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def random_words(n_words: int, vocab_size: int, seed: int) -> str:
    """`n_words` words of the synthetic vocabulary (one token each)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size - len(SPECIAL_TOKENS), (n_words,), generator=gen).tolist()
    return " ".join(f"w{i}" for i in ids)


def prompt_dataset(n_rows: int, prompt_words: int, vocab_size: int):
    """Conversational `prompt` rows of exactly `prompt_words` words each (plus the chat template's tokens), with an
    `answer` column for SD-Zero."""
    from datasets import Dataset

    prompts = [[{"role": "user", "content": random_words(prompt_words, vocab_size, seed=i)}] for i in range(n_rows)]
    return Dataset.from_dict({"prompt": prompts, "answer": ["0"] * n_rows})


def knowledge_rows(n_rows: int, words: int, vocab_size: int):
    """MixSD (question, gold answer) rows: `words` words each."""
    from datasets import Dataset

    return Dataset.from_dict({
        "question": [random_words(words, vocab_size, seed=10_000 + i) for i in range(n_rows)],
        "answer": [random_words(words, vocab_size, seed=20_000 + i) for i in range(n_rows)],
    })


# ----------------------------------------------------------------------------------------------- measuring
class Meter:
    """Wall time and peak memory on one device. CUDA: the caching allocator's statistics. CPU: the resident set
    (VmHWM reset through /proc/self/clear_refs; the suite starts workers with MALLOC_MMAP_THRESHOLD_ so freed
    tensors leave the RSS at once)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else _status_bytes("VmRSS")

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else _status_bytes("VmHWM")

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def dynamo_graph_count() -> int | None:
    """Graphs torch.compile has compiled in this process so far (None where torch does not expose the counter)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private counter: its absence must not fail a measurement
        return None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return f"CPU, {os.cpu_count()} cores"
