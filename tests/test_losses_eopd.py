"""EOPD loss (`entropy_aware_opd_loss`) against an independent per-token reference written from the spec
(../shared/specs/eopd.md), on small random fp64 tensors: values, gradients and statistics."""

import math

import pytest
import torch

from trl_sdx.losses import entropy_aware_opd_loss, eopd_loss_from_targets, teacher_targets_from_logits

B, T, V = 3, 6, 13


def reference_eopd(student_logits, teacher_logits, ids, mask, old=None, *, tau=0.8, alpha=1.0, top_k=16,
                   clip_eps=0.2, temperature=1.0, rkl_estimator="sampled"):
    """Python loop over tokens, explicit formulas, argsort instead of topk. Returns (loss, stats dict).

    Statistics as the official verl code defines them (`compute_policy_loss_on_policy_distill`): clip_fraction =
    ratios outside [1-eps, 1+eps] (`pg_clipfrac`), clip_fraction_lower = below 1-eps, ppo_kl = mean log ratio;
    clip_active_fraction = tokens whose clipped branch binds (ours)."""
    total = student_logits.sum() * 0.0
    n = gated = 0
    counts = dict(outside=0, below=0, active=0)
    sums = dict(teacher_entropy=0.0, fkl_gated=0.0, teacher_entropy_gated=0.0, rkl_estimate=0.0, ppo_kl=0.0,
                student_entropy=0.0)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                continue
            n += 1
            s = student_logits[b, t] / temperature
            z = teacher_logits[b, t].detach() / temperature
            log_ps = s - torch.logsumexp(s, 0)
            log_pt = z - torch.logsumexp(z, 0)
            y = int(ids[b, t])
            h_teacher = -(torch.exp(log_pt) * log_pt).sum()
            log_old = log_ps[y].detach() if old is None else old[b, t]
            if rkl_estimator == "sampled":
                adv = (log_pt[y] - log_old).detach()
                r = torch.exp(log_ps[y] - log_old)
                r_clip = torch.clamp(r, 1 - clip_eps, 1 + clip_eps)
                a, c = -r * adv, -r_clip * adv
                opd = a if a >= c else c
                counts["active"] += int(c > a)
                counts["below"] += int(r < 1 - clip_eps)
                counts["outside"] += int(r < 1 - clip_eps or r > 1 + clip_eps)
            else:
                opd = (torch.exp(log_ps) * (log_ps - log_pt)).sum()
            term = opd
            if not math.isinf(tau) and h_teacher >= tau:
                support = torch.argsort(z, descending=True)[: (V if top_k is None else top_k)]
                zk = z[support]
                log_ptk = zk - torch.logsumexp(zk, 0)
                fkl = (torch.exp(log_ptk) * (log_ptk - log_ps[support])).sum()
                term = term + alpha * fkl
                gated += 1
                sums["fkl_gated"] += float(fkl.detach())
                sums["teacher_entropy_gated"] += float(h_teacher)
            total = total + term
            sums["teacher_entropy"] += float(h_teacher)
            sums["rkl_estimate"] += float((log_old - log_pt[y]).detach())
            sums["ppo_kl"] += float((log_ps[y] - log_old).detach())
            sums["student_entropy"] += float(-(torch.exp(log_ps) * log_ps).sum().detach())
    d = max(n, 1)
    stats = {k: v / d for k, v in sums.items()}
    stats["fkl_gated"] = sums["fkl_gated"] / max(gated, 1)
    stats["teacher_entropy_gated"] = sums["teacher_entropy_gated"] / max(gated, 1)
    stats["gate_fraction"] = gated / d
    stats["clip_fraction"] = counts["outside"] / d
    stats["clip_fraction_lower"] = counts["below"] / d
    stats["clip_active_fraction"] = counts["active"] / d
    return total / d, stats


def make_inputs(seed=0, *, dtype=torch.float64, teacher_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=dtype).requires_grad_()
    teacher = torch.randn(B, T, V, generator=g, dtype=dtype) * teacher_scale
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, :2] = 0
    old = (student.detach().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
           + 0.4 * torch.randn(B, T, generator=g, dtype=dtype))
    return student, teacher, ids, mask, old


def assert_matches_reference(options, *, with_old=True, seed=0, teacher_scale=1.0):
    student, teacher, ids, mask, old = make_inputs(seed, teacher_scale=teacher_scale)
    old = old if with_old else None
    loss, stats = entropy_aware_opd_loss(student, teacher, ids, mask, old, return_stats=True, **options)
    ref_loss, ref_stats = reference_eopd(student, teacher, ids, mask, old, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, student)
    (ref_grad,) = torch.autograd.grad(ref_loss, student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    for name, value in ref_stats.items():
        assert stats[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name
    return loss, stats, grad


@pytest.mark.parametrize("options", [
    dict(),  # paper defaults except top_k (V is small)
    dict(tau=2.3, top_k=4),  # some tokens gated, some not
    dict(tau=2.3, top_k=4, temperature=0.7, alpha=0.5, clip_eps=0.1),
    dict(tau=2.3, top_k=None),  # full-vocabulary forward KL
    dict(tau=2.3, top_k=4, rkl_estimator="full"),
], ids=["defaults", "partial_gate", "temperature", "fkl_full_vocab", "rkl_full"])
def test_matches_reference(options):
    options = {"top_k": 5, **options}
    _, stats, _ = assert_matches_reference(options)
    if options.get("rkl_estimator") == "full":  # no ratio in the loss, nothing clipped
        assert stats["clip_fraction"].item() == 0.0 and stats["clip_active_fraction"].item() == 0.0


def test_partial_gate_is_really_partial():
    # guards the parametrised case above against silently testing an all-or-nothing gate
    _, stats, _ = assert_matches_reference(dict(tau=2.3, top_k=4))
    assert 0.0 < stats["gate_fraction"].item() < 1.0


def test_without_old_logprobs_ratio_is_one():
    _, stats, _ = assert_matches_reference(dict(tau=2.3, top_k=4), with_old=False)
    assert stats["clip_fraction"].item() == 0.0 and stats["ppo_kl"].item() == 0.0


def test_tau_inf_is_plain_opd():
    """tau=inf: gradient of mean over tokens of -(log pi_T(y) - log pi_theta(y)).detach() * log pi_theta(y)."""
    student, teacher, ids, mask, _ = make_inputs(1)
    loss, stats = entropy_aware_opd_loss(student, teacher, ids, mask, tau=math.inf, top_k=5, return_stats=True)
    logp_s = student.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    logp_t = teacher.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    m = mask.bool()
    reinforce = (-(logp_t - logp_s).detach() * logp_s)[m].mean()
    torch.testing.assert_close(loss, (logp_s - logp_t)[m].mean().detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(reinforce, student)[0])
    assert stats["gate_fraction"].item() == 0.0
    assert stats["fkl_gated"].item() == 0.0


def test_tau_zero_gates_every_token():
    loss, stats, _ = assert_matches_reference(dict(tau=0.0, top_k=4))
    assert stats["gate_fraction"].item() == 1.0
    plain, _ = reference_eopd(*make_inputs(0)[:4], make_inputs(0)[4], tau=math.inf)
    assert loss.item() > plain.item()  # FKL >= 0 was added on every token


def test_ppo_clipping_zeroes_gradient_of_clipped_tokens():
    student, teacher, ids, mask, _ = make_inputs(2)
    logp = student.detach().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    logp_t = teacher.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    # alternate ratios far outside / inside [0.8, 1.2], in both directions
    shift = torch.tensor([0.6, -0.6, 0.05, -0.05, 0.9, 0.0]).repeat(B, 1).double()
    old = logp - shift
    loss, stats = entropy_aware_opd_loss(student, teacher, ids, mask, old, tau=math.inf, top_k=5,
                                         return_stats=True)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_stats = reference_eopd(student, teacher, ids, mask, old, tau=math.inf)
    torch.testing.assert_close(loss, ref_loss)
    # clipped branch binds when the ratio left [1-eps, 1+eps] in the direction the advantage pushes
    ratio = torch.exp(shift)
    adv = logp_t - old
    expect_clipped = (((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))) & mask.bool()
    n_valid = mask.sum().item()
    assert stats["clip_active_fraction"].item() == pytest.approx(expect_clipped.sum().item() / n_valid)
    assert ref_stats["clip_active_fraction"] == pytest.approx(stats["clip_active_fraction"].item())
    # the official pg_clipfrac counts every ratio outside [0.8, 1.2], whatever the advantage's sign
    outside = ((ratio > 1.2) | (ratio < 0.8)) & mask.bool()
    assert stats["clip_fraction"].item() == pytest.approx(outside.sum().item() / n_valid)
    assert stats["clip_fraction_lower"].item() == pytest.approx(((ratio < 0.8) & mask.bool()).sum().item() / n_valid)
    assert stats["clip_fraction"].item() > stats["clip_active_fraction"].item()
    assert expect_clipped.any() and (mask.bool() & ~expect_clipped).any()
    row_norm = grad.abs().sum(-1)
    assert torch.all(row_norm[expect_clipped] == 0)
    assert torch.all(row_norm[mask.bool() & ~expect_clipped] > 0)


def test_masked_tokens_are_ignored_even_if_nan():
    student, teacher, ids, mask, old = make_inputs(3)
    loss = entropy_aware_opd_loss(student, teacher, ids, mask, old, tau=2.3, top_k=4)
    garbage_s = student.detach().clone()
    garbage_t = teacher.clone()
    garbage_old = old.clone()
    pad = mask == 0
    garbage_s[pad] = float("nan")
    garbage_t[pad] = float("inf")
    garbage_old[pad] = float("nan")
    ids_padded = ids.clone()
    ids_padded[pad] = -100
    garbage_s.requires_grad_()
    loss2 = entropy_aware_opd_loss(garbage_s, garbage_t, ids_padded, mask, garbage_old, tau=2.3, top_k=4)
    torch.testing.assert_close(loss, loss2)
    (grad,) = torch.autograd.grad(loss2, garbage_s)
    assert torch.all(grad[pad] == 0) and torch.isfinite(grad).all()


def test_all_masked_batch_gives_zero_with_grad():
    student, teacher, ids, mask, old = make_inputs(4)
    loss, stats = entropy_aware_opd_loss(student, teacher, ids, torch.zeros_like(mask), old, top_k=4,
                                         return_stats=True)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.all(student.grad == 0)
    assert stats.pop("inputs_finite").item() is True
    assert all(v.item() == 0.0 for v in stats.values())


def test_low_precision_logits_give_fp32_loss():
    student, teacher, ids, mask, old = make_inputs(5)
    loss = entropy_aware_opd_loss(student.detach().bfloat16().requires_grad_(), teacher.bfloat16(), ids, mask,
                                  old.float(), top_k=4)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=-0.1), "tau"),
    (dict(tau=float("nan")), "tau"),
    (dict(alpha=-1.0), "alpha"),
    (dict(clip_eps=0.0), "clip_eps"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=V + 1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(rkl_estimator="k3"), "rkl_estimator"),
])
def test_bad_options_raise(kwargs, match):
    student, teacher, ids, mask, old = make_inputs(6)
    with pytest.raises(ValueError, match=match):
        entropy_aware_opd_loss(student, teacher, ids, mask, old, **{"top_k": 4, **kwargs})


def test_bad_inputs_raise():
    student, teacher, ids, mask, old = make_inputs(7)
    with pytest.raises(ValueError, match="teacher_logits"):
        entropy_aware_opd_loss(student, teacher[..., :-1], ids, mask, top_k=4)
    with pytest.raises(ValueError, match="mask"):
        entropy_aware_opd_loss(student, teacher, ids, mask[:, :-1], top_k=4)
    with pytest.raises(ValueError, match="completion_ids"):
        entropy_aware_opd_loss(student, teacher, ids[:, :-1], mask, top_k=4)
    with pytest.raises(ValueError, match="completion_ids"):
        entropy_aware_opd_loss(student, teacher, ids.double(), mask, top_k=4)
    with pytest.raises(ValueError, match="old_logprobs"):
        entropy_aware_opd_loss(student, teacher, ids, mask, old[:, :-1], top_k=4)
    bad_ids = ids.clone()
    bad_ids[1, 1] = V
    with pytest.raises(ValueError, match="completion_ids"):
        entropy_aware_opd_loss(student, teacher, bad_ids, mask, top_k=4)
    bad_teacher = teacher.clone()
    bad_teacher[1, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits.*NaN"):
        entropy_aware_opd_loss(student, bad_teacher, ids, mask, top_k=4)
    bad_old = old.clone()
    bad_old[1, 1] = float("-inf")
    with pytest.raises(ValueError, match="old_logprobs"):
        entropy_aware_opd_loss(student, teacher, ids, mask, bad_old, top_k=4)


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logit_on_a_valid_token_raises(which, value):
    """Detection runs through the entropies (see `entropies_finite`): every kind of bad value must trip it."""
    student, teacher, ids, mask, old = make_inputs(8)
    student = student.detach().clone()
    target = student if which == "student" else teacher
    target[1, 2, 5] = value
    for options in (dict(top_k=4), dict(top_k=None, tau=float("inf"))):
        with pytest.raises(ValueError, match=f"{which}_logits.*NaN or infinite"):
            entropy_aware_opd_loss(student, teacher, ids, mask, old, **options)


# --------------------------------------------------------------------------------------------------------------------
# The teacher scored once (TeacherTargets) -> student-only loss: same value, gradient and stats as the reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    dict(tau=2.3, top_k=4),
    dict(tau=2.3, top_k=4, temperature=0.7, alpha=0.5, clip_eps=0.1),
    dict(tau=math.inf, top_k=None),  # gate off: no top-k support is scored at all
], ids=["partial_gate", "temperature", "gate_off"])
def test_loss_from_targets_matches_reference(options):
    student, teacher, ids, mask, old = make_inputs(9)
    targets = teacher_targets_from_logits(teacher, ids, mask, top_k=options["top_k"],
                                          temperature=options.get("temperature", 1.0))
    loss, stats = eopd_loss_from_targets(student, targets, ids, mask, old, return_stats=True, **options)
    ref_loss, ref_stats = reference_eopd(student, teacher, ids, mask, old, **options)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(ref_loss, student)[0],
                               rtol=1e-9, atol=1e-12)
    for name, value in ref_stats.items():
        assert stats[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_targets_are_the_spec_quantities_and_zero_on_padding():
    _, teacher, ids, mask, _ = make_inputs(10)
    targets = teacher_targets_from_logits(teacher, ids, mask, top_k=4, temperature=0.5)
    logp = (teacher / 0.5).log_softmax(-1)
    valid = mask.bool()
    torch.testing.assert_close(targets.entropy[valid], -(logp.exp() * logp).sum(-1)[valid])
    torch.testing.assert_close(targets.logprob[valid], logp.gather(-1, ids[..., None]).squeeze(-1)[valid])
    top = torch.argsort(teacher, -1, descending=True)[..., :4]
    assert torch.equal(targets.topk_ids[valid], top[valid])
    top_logits = (teacher / 0.5).gather(-1, top)
    torch.testing.assert_close(targets.topk_logprobs[valid], (top_logits - top_logits.logsumexp(-1, True))[valid])
    assert torch.all(targets.topk_logprobs[valid].exp().sum(-1).sub(1).abs() < 1e-12)  # renormalised on S_t
    for field in targets:
        assert torch.all(field[~valid] == 0)


def test_targets_errors_name_the_fix():
    student, teacher, ids, mask, old = make_inputs(11)
    targets = teacher_targets_from_logits(teacher, ids, mask, top_k=4)
    with pytest.raises(ValueError, match="top-4.*top_k=5"):
        eopd_loss_from_targets(student, targets, ids, mask, old, top_k=5)
    with pytest.raises(ValueError, match="full distribution"):
        eopd_loss_from_targets(student, targets, ids, mask, old, top_k=None)
    with pytest.raises(ValueError, match="TeacherTargets"):
        eopd_loss_from_targets(student, teacher, ids, mask, old, top_k=4)


def test_deferred_check_returns_a_device_flag_instead_of_raising():
    """check_finite=False (the trainer's mode): no host sync and no raise; `inputs_finite` carries the verdict."""
    student, teacher, ids, mask, old = make_inputs(12)
    _, stats = entropy_aware_opd_loss(student, teacher, ids, mask, old, top_k=4, return_stats=True,
                                      check_finite=False)
    assert stats["inputs_finite"].dtype == torch.bool and bool(stats["inputs_finite"])
    bad_teacher = teacher.clone()
    bad_teacher[1, 1, 3] = float("nan")
    bad_ids = ids.clone()
    bad_ids[0, 0] = V + 3
    for args in ((student, bad_teacher, ids), (student, teacher, bad_ids)):
        _, stats = entropy_aware_opd_loss(*args, mask, old, top_k=4, return_stats=True, check_finite=False)
        assert not bool(stats["inputs_finite"])
    targets = teacher_targets_from_logits(bad_teacher, ids, mask, top_k=4)
    _, stats = eopd_loss_from_targets(student, targets, ids, mask, old, top_k=4, tau=2.3, return_stats=True,
                                      check_finite=False)
    assert not bool(stats["inputs_finite"])
