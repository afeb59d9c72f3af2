"""SD-Zero top-k distillation loss (`topk_distillation_loss`) against an independent per-token reference
written from ../shared/specs/sdzero.md ("Loss per token"), on small random fp64 tensors."""

import pytest
import torch

from trl_sdx.losses import topk_distillation_loss

B, T, V = 3, 5, 11


def reference_topk(student_logits, teacher_logits, mask, *, kl_type="mixed", mixed_kl_weight=0.5, top_k=64,
                   temperature=1.0):
    """Loop over tokens; support from argsort; both sides renormalised with an explicit logsumexp."""
    total = student_logits.sum() * 0.0
    per_token = torch.zeros(mask.shape, dtype=student_logits.dtype)
    n = 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            n += 1
            z = teacher_logits[b, t].detach() / temperature
            s = student_logits[b, t] / temperature
            support = torch.argsort(z, descending=True)[: (V if top_k is None else top_k)]
            log_pt = z[support] - torch.logsumexp(z[support], 0)
            log_ps = s[support] - torch.logsumexp(s[support], 0)
            forward = (torch.exp(log_pt) * (log_pt - log_ps)).sum()
            reverse = (torch.exp(log_ps) * (log_ps - log_pt)).sum()
            w = {"forward": 1.0, "reverse": 0.0, "mixed": mixed_kl_weight}[kl_type]
            term = w * forward + (1 - w) * reverse
            per_token[b, t] = term.detach()
            total = total + term
    return total / max(n, 1), per_token


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_()
    teacher = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    mask[2, 0] = 0
    return student, teacher, mask


@pytest.mark.parametrize("options", [
    dict(kl_type="forward", top_k=4),
    dict(kl_type="reverse", top_k=4),
    dict(kl_type="mixed", top_k=4),
    dict(kl_type="mixed", mixed_kl_weight=0.2, top_k=6, temperature=1.7),
    dict(kl_type="mixed", top_k=None, temperature=0.6),
    dict(kl_type="reverse", top_k=1),  # one-token support: both renormalised to 1, loss exactly 0
])
def test_matches_reference(options):
    student, teacher, mask = make_inputs()
    loss, stats = topk_distillation_loss(student, teacher, mask, return_stats=True, **options)
    ref_loss, ref_per_token = reference_topk(student, teacher, mask, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["per_token_loss"], ref_per_token, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    (ref_grad,) = torch.autograd.grad(ref_loss, student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert torch.all(grad[mask == 0] == 0)
    if options["top_k"] == 1:
        assert loss.item() == 0.0
    else:
        assert loss.item() > 0


def test_mixed_is_weighted_sum_and_stats():
    student, teacher, mask = make_inputs(1)
    fwd, _ = reference_topk(student, teacher, mask, kl_type="forward", top_k=4)
    rev, _ = reference_topk(student, teacher, mask, kl_type="reverse", top_k=4)
    loss, stats = topk_distillation_loss(student, teacher, mask, kl_type="mixed", mixed_kl_weight=0.3, top_k=4,
                                         return_stats=True)
    torch.testing.assert_close(loss, 0.3 * fwd + 0.7 * rev)
    torch.testing.assert_close(stats["forward_kl"], fwd.detach())
    torch.testing.assert_close(stats["reverse_kl"], rev.detach())
    assert stats["per_token_loss"].shape == mask.shape and not stats["per_token_loss"].requires_grad
    # per-sample losses sum back to the batch loss (token-mean over all valid tokens)
    torch.testing.assert_close(stats["per_token_loss"].sum() / mask.sum(), loss.detach())


def test_student_is_renormalised_on_the_support():
    """Adding a huge logit to the student OUTSIDE the teacher's top-k must not change the loss."""
    student, teacher, mask = make_inputs(2)
    loss = topk_distillation_loss(student, teacher, mask, top_k=3)
    outside = teacher.argsort(-1)[..., :1]  # the teacher's smallest logit is never in its top-3
    moved = student.detach().clone().scatter_add_(-1, outside, torch.full_like(outside, 50.0, dtype=student.dtype))
    torch.testing.assert_close(topk_distillation_loss(moved, teacher, mask, top_k=3), loss.detach())


def test_masked_nan_ignored_and_all_masked_zero():
    student, teacher, mask = make_inputs(3)
    loss = topk_distillation_loss(student, teacher, mask, top_k=4)
    garbage = student.detach().clone()
    garbage[mask == 0] = float("nan")
    torch.testing.assert_close(topk_distillation_loss(garbage, teacher, mask, top_k=4), loss.detach())

    zero, stats = topk_distillation_loss(student, teacher, torch.zeros_like(mask), top_k=4, return_stats=True)
    assert zero.item() == 0.0 and zero.grad_fn is not None
    zero.backward()
    assert torch.all(student.grad == 0)
    assert torch.all(stats["per_token_loss"] == 0) and stats["per_token_loss"].shape == mask.shape


@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_type="jsd"), "kl_type"),
    (dict(mixed_kl_weight=1.5), "mixed_kl_weight"),
    (dict(mixed_kl_weight=-0.1), "mixed_kl_weight"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=V + 1), "top_k"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_options_raise(kwargs, match):
    student, teacher, mask = make_inputs(4)
    with pytest.raises(ValueError, match=match):
        topk_distillation_loss(student, teacher, mask, **{"top_k": 4, **kwargs})


def test_bad_inputs_raise():
    student, teacher, mask = make_inputs(5)
    with pytest.raises(ValueError, match="teacher_logits"):
        topk_distillation_loss(student, teacher[:, :-1], mask, top_k=4)
    with pytest.raises(ValueError, match="mask"):
        topk_distillation_loss(student, teacher, mask[0], top_k=4)
    bad = student.detach().clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="student_logits.*NaN or infinite"):
        topk_distillation_loss(bad, teacher, mask, top_k=4)
