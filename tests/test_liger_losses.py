"""SD-Zero's top-k KL on Liger's distillation base (`liger_topk_distillation_loss`) and the
`loss_implementation` switch: both kernels equal the plain full-logits loss in value and in the hidden-state,
weight and bias gradients."""

import pytest
import torch

from trl_sdx.liger import AUTO_LOSS_IMPLEMENTATION, resolve_loss_implementation
from trl_sdx.losses import fused_topk_distillation_loss, liger_topk_distillation_loss, topk_distillation_loss
from trl_sdx.losses.topk_kl_liger import IGNORE_INDEX, LigerFusedLinearTopKKLFunction

B, T, HS, HT, V = 3, 9, 16, 12, 40
KERNELS = {"native": fused_topk_distillation_loss, "liger": liger_topk_distillation_loss}


def make_inputs(seed=0, b=B, t=T, nan_in_padding=True):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(b, t, HS, generator=g).requires_grad_()
    student_weight = (0.5 * torch.randn(V, HS, generator=g)).requires_grad_()
    student_bias = (0.1 * torch.randn(V, generator=g)).requires_grad_()
    teacher_hidden = torch.randn(b, t, HT, generator=g)
    teacher_weight = torch.randn(V, HT, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[0, 0] = 1
    if nan_in_padding and (mask == 0).any():  # padding may hold anything: it must not reach values or gradients
        student_hidden.data[mask == 0] = float("nan")
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, mask


def plain_loss_and_grads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, mask, **opts):
    hidden = torch.where(mask[..., None].bool(), student_hidden, 0.0)
    student_logits = hidden @ student_weight.t() + student_bias
    teacher_logits = teacher_hidden @ teacher_weight.t()
    loss, stats = topk_distillation_loss(student_logits, teacher_logits, mask, return_stats=True, **opts)
    grads = torch.autograd.grad(loss, [student_hidden, student_weight, student_bias])
    return loss, grads, stats["per_token_loss"]


@pytest.mark.parametrize("implementation", ["liger", "native"])
@pytest.mark.parametrize("options", [
    dict(kl_type="forward", top_k=8),
    dict(kl_type="reverse", top_k=8),
    dict(kl_type="mixed", mixed_kl_weight=0.5, top_k=8),
    dict(kl_type="mixed", mixed_kl_weight=0.3, top_k=None, temperature=1.7),
])
def test_kernel_matches_plain_loss(implementation, options):
    inputs = make_inputs()
    ref_loss, ref_grads, _ = plain_loss_and_grads(*inputs, **options)
    s_hidden, s_weight, s_bias, t_hidden, t_weight, mask = inputs
    loss = KERNELS[implementation](s_hidden, s_weight, t_hidden, t_weight, mask, student_bias=s_bias,
                                   chunk_size=5, **options)  # several chunks, the last one short
    grads = torch.autograd.grad(loss, [s_hidden, s_weight, s_bias])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_reward_groups_add_up_to_the_loss():
    """One Liger call per reward value: per-group sums and counts give the per-reward KL, and they add to the loss."""
    inputs = make_inputs(seed=1)
    s_hidden, s_weight, s_bias, t_hidden, t_weight, mask = inputs
    rewards = torch.tensor([1.0, 0.0, 1.0])
    loss, stats = liger_topk_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, mask, student_bias=s_bias,
                                               top_k=8, chunk_size=4, groups=rewards, return_stats=True)
    ref_loss, ref_grads, per_token = plain_loss_and_grads(*inputs, top_k=8)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, [s_hidden, s_weight, s_bias]), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert stats["group_values"].tolist() == [0.0, 1.0]
    for i, value in enumerate(stats["group_values"].tolist()):
        rows = (rewards == value).nonzero().squeeze(1)
        torch.testing.assert_close(stats["group_loss_sums"][i], (per_token[rows] * mask[rows]).sum(), rtol=1e-5,
                                   atol=1e-6)
        assert stats["group_token_counts"][i] == mask[rows].sum()
    torch.testing.assert_close(stats["group_loss_sums"].sum() / mask.sum(), ref_loss.detach(), rtol=1e-5, atol=1e-6)


def test_changing_token_count_runs_eager(monkeypatch):
    """Training changes N every step; Liger's compiled step crashed on the third distinct N (anchors.md). The
    Liger kernel must never compile: with torch.compile made to fail, 5 steps with 5 different N still match."""
    def no_compile(*args, **kwargs):
        raise AssertionError("the Liger top-k KL kernel must run eager")

    monkeypatch.setattr(torch, "compile", no_compile)
    for step, t in enumerate((3, 7, 12, 5, 16)):
        inputs = make_inputs(seed=10 + step, b=2, t=t)
        s_hidden, s_weight, s_bias, t_hidden, t_weight, mask = inputs
        loss = liger_topk_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, mask, student_bias=s_bias,
                                            top_k=8, chunk_size=4)
        ref_loss, ref_grads, _ = plain_loss_and_grads(*inputs, top_k=8)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(loss, s_hidden)[0], ref_grads[0], rtol=1e-4, atol=1e-6)


def test_ignore_index_in_target_excludes_rows():
    """The Liger Function itself: rows whose target is IGNORE_INDEX neither count nor get a gradient."""
    s_hidden, s_weight, s_bias, t_hidden, t_weight, mask = make_inputs(seed=2, nan_in_padding=False)
    rows_s, rows_t = s_hidden.reshape(-1, HS), t_hidden.reshape(-1, HT)
    target = torch.where(mask.reshape(-1).bool(), 0, IGNORE_INDEX)
    loss = LigerFusedLinearTopKKLFunction.apply(rows_s, s_weight, rows_t, t_weight, target, s_bias, None,
                                                "mixed", 0.5, 8, 1.0, 4)
    ref_loss, ref_grads, _ = plain_loss_and_grads(s_hidden, s_weight, s_bias, t_hidden, t_weight, mask, top_k=8)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    grad_hidden = torch.autograd.grad(loss, s_hidden)[0]
    torch.testing.assert_close(grad_hidden, ref_grads[0], rtol=1e-4, atol=1e-6)
    assert torch.all(grad_hidden[mask == 0] == 0)


def test_all_masked_is_zero_with_a_gradient():
    s_hidden, s_weight, s_bias, t_hidden, t_weight, mask = make_inputs(seed=3)
    loss, stats = liger_topk_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, torch.zeros_like(mask),
                                               top_k=8, groups=torch.ones(B), return_stats=True)
    loss.backward()
    assert loss.item() == 0.0 and stats["group_loss_sums"].numel() == 0
    assert torch.all(s_weight.grad == 0)


def test_bad_groups_shape_is_rejected():
    s_hidden, s_weight, _, t_hidden, t_weight, mask = make_inputs(seed=4)
    with pytest.raises(ValueError, match="one value per sample"):
        liger_topk_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, mask, top_k=8, groups=torch.ones(B + 1))


def test_loss_implementation_switch():
    assert resolve_loss_implementation("auto", "cpu") == AUTO_LOSS_IMPLEMENTATION["cpu"]
    assert resolve_loss_implementation("auto", torch.device("cuda", 0)) == AUTO_LOSS_IMPLEMENTATION["cuda"]
    assert resolve_loss_implementation("liger", "cpu") == "liger"
    assert resolve_loss_implementation("native", "cuda") == "native"
    with pytest.raises(ValueError, match="loss_implementation"):
        resolve_loss_implementation("triton", "cpu")
