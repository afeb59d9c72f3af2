"""`use_liger_kernel=True` in the three trainers, and SD-Zero's `loss_implementation` switch inside the trainer.

On CPU Liger's Triton kernels cannot run, so these tests check what CPU allows: the no-CUDA error at construction,
and (with the CUDA check patched out) that Liger's apply function patched the student's and the teacher's modules,
and that `Trainer.train` hands the student and the config on to Liger (recorded, then stopped)."""

import sys

import pytest
import torch
from tiny_trainers import build_entropy_gkd, build_mixsd, build_sdzero

import trl_sdx.liger

BUILDERS = {"eopd": build_entropy_gkd, "sdzero": build_sdzero, "mixsd": build_mixsd}


@pytest.fixture
def restore_transformers_modeling():
    """Liger's apply functions also rebind module globals (e.g. `modeling_llama.LlamaRMSNorm`); later CPU tests
    must get the originals back."""
    modules = {name: dict(vars(module)) for name, module in list(sys.modules.items())
               if name.startswith("transformers.models.") and ".modeling_" in name}
    yield
    for name, saved in modules.items():
        module = sys.modules[name]
        for key in set(vars(module)) - set(saved):
            delattr(module, key)
        vars(module).update(saved)


@pytest.fixture
def liger_usable(monkeypatch, restore_transformers_modeling):
    """Pretend this machine can run Liger's kernels (nothing here runs one: no forward after patching)."""
    monkeypatch.setattr(trl_sdx.liger, "liger_kernel_unavailable", lambda args: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_no_cuda_is_one_clear_error_at_construction(tmp_path, method):
    with pytest.raises(ValueError, match=r"`use_liger_kernel=True` needs a CUDA GPU .* this machine has no CUDA"):
        BUILDERS[method](tmp_path, max_steps=1, use_liger_kernel=True, use_cpu=False)
    with pytest.raises(ValueError, match="`use_cpu=True` is set"):
        BUILDERS[method](tmp_path, max_steps=1, use_liger_kernel=True)


def _assert_liger_patched(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.model
    assert decoder.norm._get_name() == "LigerRMSNorm"
    for layer in decoder.layers:
        assert layer.input_layernorm._get_name() == "LigerRMSNorm"
        assert layer.post_attention_layernorm._get_name() == "LigerRMSNorm"
        assert layer.mlp._get_name() == "LigerSwiGLUMLP"
    assert "forward" not in vars(base), "Liger's fused linear cross-entropy must stay off (it replaces forward)"


class StopAtLiger(Exception):
    pass


def _record_train_time_apply(monkeypatch):
    """`Trainer.train` calls `apply_liger_kernel(self.model, args.liger_kernel_config)` first: record, then stop."""
    import transformers.trainer

    calls = []

    def record(model, config):
        calls.append((model, config))
        raise StopAtLiger

    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", record)
    return calls


@pytest.mark.parametrize("method", ["eopd", "sdzero"])
def test_distillation_trainers_patch_student_and_teacher(tmp_path, monkeypatch, liger_usable, method):
    trainer = BUILDERS[method](tmp_path, max_steps=1, use_liger_kernel=True)
    assert trainer.args.liger_kernel_config == {"fused_linear_cross_entropy": False}
    _assert_liger_patched(trainer.accelerator.unwrap_model(trainer.model))
    _assert_liger_patched(trainer.accelerator.unwrap_model(trainer.teacher_model))

    calls = _record_train_time_apply(monkeypatch)
    with pytest.raises(StopAtLiger):
        trainer.train()
    assert calls == [(trainer.model, {"fused_linear_cross_entropy": False})]


def test_mixsd_hands_the_flag_to_sft_trainer(tmp_path, monkeypatch, liger_usable):
    """MixSD trains with SFTTrainer, which applies Liger's model kernels at `train()`; TRL 1.16's SFTTrainer keeps
    Liger's fused linear cross-entropy off (it has its own chunked LM head)."""
    trainer = build_mixsd(tmp_path, max_steps=1, use_liger_kernel=True)
    calls = _record_train_time_apply(monkeypatch)
    with pytest.raises(StopAtLiger):
        trainer.train()
    assert len(calls) == 1 and calls[0][0] is trainer.model
    assert calls[0][1]["fused_linear_cross_entropy"] is False


def test_liger_fused_linear_cross_entropy_is_refused(tmp_path, liger_usable):
    with pytest.raises(ValueError, match="fused_linear_cross_entropy"):
        build_sdzero(tmp_path, max_steps=1, use_liger_kernel=True,
                     liger_kernel_config={"fused_linear_cross_entropy": True})


def test_sdzero_liger_and_native_kernels_agree_in_the_trainer(tmp_path):
    """The same rollout through both `loss_implementation`s: same loss, same per-reward KL metrics."""
    trainer = build_sdzero(tmp_path, max_steps=1, loss_implementation="liger", per_device_train_batch_size=4)
    assert trainer.loss_implementation == "liger"
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(4)])
    batch["sdzero_rewards"] = torch.tensor([1.0, 0.0, 1.0, 1.0])  # both reward groups present
    results = {}
    for implementation in ("liger", "native"):
        trainer.loss_implementation = implementation
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, batch)
        grads = torch.autograd.grad(loss, [p for p in trainer.model.parameters() if p.requires_grad])
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("sdzero/kl")}
        results[implementation] = (loss.detach(), grads, metrics)
    (liger_loss, liger_grads, liger_metrics), (native_loss, native_grads, native_metrics) = results.values()
    torch.testing.assert_close(liger_loss, native_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(liger_grads, native_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert set(liger_metrics) == {"sdzero/kl", "sdzero/kl_correct", "sdzero/kl_incorrect"}
    assert liger_metrics == pytest.approx(native_metrics, rel=1e-5)
