"""Fused (chunked lm_head) losses == plain losses on logits = hidden @ W^T + b: values, gradients w.r.t.
student hidden / weight / bias, and statistics; plus chunking behaviour and the compiled path."""

import pytest
import torch

import trl_sdx.losses.fused as fused_module
from trl_sdx.losses import (
    entropy_aware_opd_loss,
    fused_entropy_aware_opd_loss,
    fused_eopd_loss_from_targets,
    fused_topk_distillation_loss,
    TeacherTargets,
    score_teacher_targets,
    topk_distillation_loss,
)

B, T, V, HS, HT = 3, 7, 37, 8, 12  # V prime; 21 tokens, never a multiple of the chunk sizes used


def make_inputs(seed=0, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=dtype))

    student_hidden = randn(B, T, HS).requires_grad_()
    student_weight = randn(V, HS, scale=0.7).requires_grad_()
    student_bias = randn(V, scale=0.3).requires_grad_() if bias else None
    teacher_hidden, teacher_weight = randn(B, T, HT), randn(V, HT, scale=0.6)
    teacher_bias = randn(V, scale=0.3) if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, :3] = 0
    old = randn(B, T, scale=0.3) - 3.0
    return dict(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                ids=ids, mask=mask, old=old)


def logits(hidden, weight, bias):
    out = hidden @ weight.t()
    return out if bias is None else out + bias


def student_params(x):
    return [p for p in (x["student_hidden"], x["student_weight"], x["student_bias"]) if p is not None]


def plain_eopd(x, with_old=True, **options):
    return entropy_aware_opd_loss(
        logits(x["student_hidden"], x["student_weight"], x["student_bias"]),
        logits(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"]),
        x["ids"], x["mask"], x["old"] if with_old else None, return_stats=True, **options)


def fused_eopd(x, with_old=True, **options):
    return fused_entropy_aware_opd_loss(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["ids"], x["mask"],
        x["old"] if with_old else None, student_bias=x["student_bias"], teacher_bias=x["teacher_bias"],
        return_stats=True, **options)


def assert_same(plain, fused, params, *, rtol=1e-10, atol=1e-12):
    (loss_p, stats_p), (loss_f, stats_f) = plain, fused
    torch.testing.assert_close(loss_f, loss_p, rtol=rtol, atol=atol)
    for got, want in zip(torch.autograd.grad(loss_f, params), torch.autograd.grad(loss_p, params)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    assert stats_f.keys() == stats_p.keys()
    for name in stats_p:
        torch.testing.assert_close(stats_f[name], stats_p[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("options", [
    dict(tau=3.0, top_k=5, chunk_size=4),
    dict(tau=3.0, top_k=5, temperature=0.8, clip_eps=0.1, chunk_size=5),
    dict(tau=0.0, top_k=None, alpha=0.5, chunk_size=64),  # one chunk larger than the batch
    dict(tau=float("inf"), top_k=5, chunk_size=1),
    dict(tau=3.0, top_k=7, rkl_estimator="full", chunk_size=6),
], ids=["default", "temperature", "full_vocab_fkl", "plain_opd", "rkl_full"])
@pytest.mark.parametrize("with_old", [True, False], ids=["old", "no_old"])
def test_fused_eopd_matches_plain(options, with_old):
    x = make_inputs()
    assert_same(plain_eopd(x, with_old, **{k: v for k, v in options.items() if k != "chunk_size"}),
                fused_eopd(x, with_old, **options), student_params(x))


def test_fused_eopd_clipping_and_gate_are_exercised():
    x = make_inputs(1)
    with torch.no_grad():
        s_logp = logits(x["student_hidden"], x["student_weight"], x["student_bias"]).log_softmax(-1)
        logp = s_logp.gather(-1, x["ids"][..., None]).squeeze(-1)
    x["old"] = logp + torch.linspace(-0.8, 0.8, B * T, dtype=logp.dtype).view(B, T)
    plain = plain_eopd(x, tau=3.0, top_k=5)
    stats = plain[1]
    assert 0 < stats["clip_fraction"].item() < 1 and 0 < stats["gate_fraction"].item() < 1
    assert_same(plain, fused_eopd(x, tau=3.0, top_k=5, chunk_size=4), student_params(x))


@pytest.mark.parametrize("options", [
    dict(kl_type="mixed", top_k=5, chunk_size=4),
    dict(kl_type="forward", top_k=5, temperature=1.5, chunk_size=5),
    dict(kl_type="reverse", top_k=None, temperature=0.7, chunk_size=3),
])
def test_fused_topk_matches_plain(options):
    x = make_inputs(2)
    plain = topk_distillation_loss(
        logits(x["student_hidden"], x["student_weight"], x["student_bias"]),
        logits(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"]), x["mask"], return_stats=True,
        **{k: v for k, v in options.items() if k != "chunk_size"})
    fused = fused_topk_distillation_loss(
        x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["mask"],
        student_bias=x["student_bias"], teacher_bias=x["teacher_bias"], return_stats=True, **options)
    assert_same(plain, fused, student_params(x))


def test_no_bias_frozen_weight_and_grad_scaling():
    x = make_inputs(3, bias=False)
    x["student_weight"].requires_grad_(False)
    loss_p, _ = plain_eopd(x, tau=3.0, top_k=5)
    loss_f, _ = fused_eopd(x, tau=3.0, top_k=5, chunk_size=4)
    (g_p,) = torch.autograd.grad(2.5 * loss_p, x["student_hidden"])
    (g_f,) = torch.autograd.grad(2.5 * loss_f, x["student_hidden"])  # incoming grad != 1 rescales
    torch.testing.assert_close(g_f, g_p, rtol=1e-10, atol=1e-12)


def test_masked_rows_ignored_even_if_nan_and_all_masked():
    x = make_inputs(4)
    loss = fused_eopd(x, tau=3.0, top_k=5, chunk_size=4)[0].detach()
    pad = x["mask"] == 0
    hidden = x["student_hidden"].detach().clone()
    hidden[pad] = float("nan")
    hidden.requires_grad_()
    teacher_hidden = x["teacher_hidden"].clone()
    teacher_hidden[pad] = float("inf")
    ids = x["ids"].clone()
    ids[pad] = -100
    loss2 = fused_entropy_aware_opd_loss(hidden, x["student_weight"], teacher_hidden, x["teacher_weight"], ids,
                                         x["mask"], x["old"], student_bias=x["student_bias"],
                                         teacher_bias=x["teacher_bias"], tau=3.0, top_k=5, chunk_size=4)
    torch.testing.assert_close(loss2, loss)
    (grad,) = torch.autograd.grad(loss2, hidden)
    assert torch.all(grad[pad] == 0) and torch.isfinite(grad).all()

    x["mask"] = torch.zeros_like(x["mask"])
    for zero in (fused_eopd(x, top_k=5)[0], fused_topk_distillation_loss(
            x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["mask"], top_k=5,
            student_bias=x["student_bias"])):
        assert zero.item() == 0.0 and zero.grad_fn is not None
        grads = torch.autograd.grad(zero, student_params(x))
        assert all(torch.all(g == 0) for g in grads)


def test_never_builds_logits_for_more_than_one_chunk(monkeypatch):
    seen = []
    original = fused_module._chunk_step

    def spy(chunk_fn, options, student_hidden, *args):
        seen.append(student_hidden.shape[0])
        return original(chunk_fn, options, student_hidden, *args)

    monkeypatch.setattr(fused_module, "_chunk_step", spy)
    x = make_inputs(5)
    fused_eopd(x, top_k=5, chunk_size=4)
    n_valid = int(x["mask"].sum())
    assert max(seen) == 4 and sum(seen) == n_valid and len(seen) == -(-n_valid // 4)


def test_bad_inputs_raise():
    x = make_inputs(6)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_eopd(x, top_k=5, chunk_size=0)
    with pytest.raises(ValueError, match="student_weight"):
        fused_entropy_aware_opd_loss(x["student_hidden"], x["teacher_weight"], x["teacher_hidden"],
                                     x["teacher_weight"], x["ids"], x["mask"], top_k=5)
    with pytest.raises(ValueError, match="vocab"):
        fused_entropy_aware_opd_loss(x["student_hidden"], x["student_weight"][:-1], x["teacher_hidden"],
                                     x["teacher_weight"], x["ids"], x["mask"], top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        fused_topk_distillation_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"],
                                     x["teacher_weight"], x["mask"], top_k=V + 1)
    weight = x["teacher_weight"].clone()
    weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fused_entropy_aware_opd_loss(x["student_hidden"], x["student_weight"], x["teacher_hidden"], weight,
                                     x["ids"], x["mask"], top_k=5)


def _long_inputs(n_tokens, seed=0, dtype=torch.float64):
    """`make_inputs` with one sequence of `n_tokens` valid tokens (chunk sizes above the 64-row bucket minimum)."""
    g = torch.Generator().manual_seed(seed + n_tokens)
    x = make_inputs(seed, dtype=dtype)
    x["student_hidden"] = torch.randn(1, n_tokens, HS, generator=g, dtype=dtype).requires_grad_()
    x["teacher_hidden"] = torch.randn(1, n_tokens, HT, generator=g, dtype=dtype)
    x["ids"] = torch.randint(0, V, (1, n_tokens), generator=g)
    x["mask"], x["old"] = torch.ones(1, n_tokens), torch.randn(1, n_tokens, generator=g, dtype=dtype) - 3
    return x


@pytest.mark.parametrize("backend, chunk_size, token_counts, shapes", [
    ("aot_eager", 128, (21, 100, 150, 300, 77), 2),  # chunks [64], [128], [128, 64], [128, 128, 64], [128]
    ("inductor", 64, (21, 50, 64, 150), 1),  # every chunk padded to 64 rows: one graph
], ids=["aot_eager", "inductor"])
def test_compiled_survives_changing_token_counts(monkeypatch, backend, chunk_size, token_counts, shapes):
    """Calls with different token counts (less than one chunk, a partial last chunk, several chunks) through the
    torch.compile'd chunk step: each equals the plain loss, and once every bucket shape has been seen no call
    compiles again. `aot_eager` traces dynamo + autograd as on a GPU (the recompilation failure recorded in
    ../shared/specs/anchors.md is a dynamo guard error); `inductor` adds code generation, which on this CPU costs
    ~15-40 s per graph, hence one shape there. fp32 keeps inductor on its common path."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    monkeypatch.setattr(fused_module, "_compiled_step", torch.compile(fused_module._compiled_chunk_step,
                                                                      dynamic=False, backend=backend))
    graphs = []
    for n_tokens in token_counts:
        x = _long_inputs(n_tokens, dtype=torch.float32)
        plain = plain_eopd(x, tau=3.0, top_k=5)
        fused = fused_eopd(x, tau=3.0, top_k=5, chunk_size=chunk_size, compiled=True)
        assert_same(plain, fused, student_params(x), rtol=2e-5, atol=2e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[shapes - 1:] == [graphs[shapes - 1]] * (len(graphs) - shapes + 1)
    assert len(set(graphs)) == shapes


@pytest.mark.parametrize("chunk_size", [256, 1000, 1024, 4096])
def test_chunk_buckets_at_realistic_chunk_sizes(chunk_size):
    """Every token count from 1 to 3 chunks: each chunk pads to a power-of-two bucket >= 64 (or the chunk size),
    by less than 2x, and the whole range needs only log2(chunk_size / 64) + 1 shapes (+1 if not a power of two)."""
    buckets = set()
    for n_rows in range(1, 3 * chunk_size + 1, 7):
        for start in range(0, n_rows, chunk_size):
            real = min(chunk_size, n_rows - start)
            bucket = fused_module.chunk_bucket(real, chunk_size)
            assert real <= bucket <= chunk_size
            assert bucket == 64 or bucket < 2 * real, (real, bucket)
            buckets.add(bucket)
    expected = {64 * 2**i for i in range(12) if 64 * 2**i < chunk_size} | {chunk_size}
    assert buckets == expected


def test_compiled_path_pads_chunks_to_buckets_and_keeps_the_value(monkeypatch):
    """The compiled path's padding and masking at a realistic chunk size (256), without paying for compilation:
    the step the compiled path would trace (`functional=True`) runs eagerly and records its row counts."""
    seen = []

    def traced_step(*args):
        seen.append(args[2].shape[0])
        return fused_module._chunk_step(*args, functional=True)

    monkeypatch.setattr(fused_module, "_get_step", lambda compiled: traced_step if compiled else None)
    for n_tokens, expected_rows in ((21, [64]), (100, [128]), (300, [256, 64]), (700, [256, 256, 256])):
        x = _long_inputs(n_tokens)
        seen.clear()
        fused = fused_eopd(x, tau=3.0, top_k=5, chunk_size=256, compiled=True)
        assert seen == expected_rows
        assert_same(plain_eopd(x, tau=3.0, top_k=5), fused, student_params(x))


def test_default_chunk_size_keeps_chunk_temporaries_within_1_gib():
    from trl_sdx.losses._common import LIVE_CHUNK_TENSORS, loss_chunk_size_for_vocab

    for vocab, rows in ((151_936, 256), (49_152, 512), (32_768, 1024), (128_256, 256), (262_144, 128), (384, 4096)):
        chosen = loss_chunk_size_for_vocab(vocab)
        assert chosen == rows, vocab
        assert chosen == 4096 or chosen * vocab * 4 * LIVE_CHUNK_TENSORS <= 1 << 30
        assert chosen * 2 > 4096 or 2 * chosen * vocab * 4 * LIVE_CHUNK_TENSORS > 1 << 30  # the largest that fits
    # Qwen3's vocabulary: 256 rows x 151,936 x 6 fp32 temporaries = 0.87 GiB (the old 1024-row default: 3.5 GiB)
    qwen3_bytes = loss_chunk_size_for_vocab(151_936) * 151_936 * 4 * LIVE_CHUNK_TENSORS
    assert qwen3_bytes / 2**30 == pytest.approx(0.87, abs=0.01)
    with pytest.raises(ValueError, match="vocab_size"):
        loss_chunk_size_for_vocab(0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_fused_non_finite_logits_raise(value):
    x = make_inputs(8)
    weight = x["student_weight"].detach().clone()
    weight[3] = 0.0
    bias = x["student_bias"].detach().clone()
    bias[3] = value  # logit 3 of every row is non-finite
    with pytest.raises(ValueError, match="NaN or infinite"):
        fused_entropy_aware_opd_loss(x["student_hidden"], weight, x["teacher_hidden"], x["teacher_weight"],
                                     x["ids"], x["mask"], top_k=5, student_bias=bias, chunk_size=4)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fused_topk_distillation_loss(x["student_hidden"], weight, x["teacher_hidden"], x["teacher_weight"],
                                     x["mask"], top_k=5, student_bias=bias, chunk_size=4)


# --------------------------------------------------------------------------------------------------------------------
# Precision: every dtype combination users run, against an fp64 reference on the same (rounded) inputs
# --------------------------------------------------------------------------------------------------------------------

# Relative error (norm of the difference / norm of the reference) allowed per dtype of the lm_head product:
# bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.4% per logit); fp32 24 bits.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def _precision_inputs(seed=20):
    g = torch.Generator().manual_seed(seed)
    x = dict(hidden=torch.randn(B, T, HS, generator=g), weight=0.7 * torch.randn(V, HS, generator=g),
             bias=0.3 * torch.randn(V, generator=g), teacher_hidden=torch.randn(B, T, HT, generator=g),
             teacher_weight=0.6 * torch.randn(V, HT, generator=g), ids=torch.randint(0, V, (B, T), generator=g))
    x["mask"] = torch.ones(B, T)
    x["mask"][0, 5:] = 0
    x["old"] = 0.3 * torch.randn(B, T, generator=g) - 3.0
    # The teacher's targets in fp32: the dtype under test is the student's lm_head product.
    x["targets"] = score_teacher_targets(x["teacher_hidden"], x["teacher_weight"], x["ids"], x["mask"], top_k=5)
    return x


def _fp64_reference(x, hidden, weight, bias):
    """The plain loss on fp64 logits of the same (already rounded) values; returns (loss, d/dhidden, d/dW, d/db)."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    teacher = x["teacher_hidden"].double() @ x["teacher_weight"].double().t()
    loss = entropy_aware_opd_loss(logits, teacher, x["ids"], x["mask"], x["old"].double(), tau=2.0, top_k=5)
    return (loss, *torch.autograd.grad(loss, leaves))


def _check_against_reference(x, loss, hidden, weight, bias, grads, compute_dtype):
    ref_loss, *ref_grads = _fp64_reference(x, hidden, weight, bias)
    assert loss.dtype == torch.float32  # the loss math runs in fp32 whatever the product's dtype
    tol = TOLERANCE[compute_dtype]
    assert _rel_err(loss, ref_loss) < tol
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert want.norm() > 0 and _rel_err(got, want) < tol, (name, _rel_err(got, want))


@pytest.mark.parametrize("case", ["bf16_weights_and_hidden", "fp32_master_weights_under_bf16_autocast",
                                  "fp32_everything"])
def test_fused_loss_accepts_every_precision(case):
    x = _precision_inputs()
    hidden = x["hidden"].bfloat16() if case != "fp32_everything" else x["hidden"]
    params = (x["weight"], x["bias"]) if case != "bf16_weights_and_hidden" else (x["weight"].bfloat16(),
                                                                                 x["bias"].bfloat16())
    hidden = hidden.requires_grad_()
    weight, bias = (p.clone().requires_grad_() for p in params)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.endswith("autocast"))
    with autocast:
        loss = fused_eopd_loss_from_targets(hidden, weight, x["targets"], x["ids"], x["mask"], x["old"],
                                            student_bias=bias, tau=2.0, top_k=5, chunk_size=4)
    loss.backward()
    # each gradient comes back in its parameter's own dtype (fp32 masters get fp32 gradients)
    assert (hidden.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (hidden.dtype, weight.dtype, bias.dtype)
    compute = torch.float32 if case == "fp32_everything" else torch.bfloat16
    _check_against_reference(x, loss, hidden, weight, bias, (hidden.grad, weight.grad, bias.grad), compute)


def test_fsdp2_dtensor_lm_head_is_gathered_and_cast_like_trl():
    """An FSDP2-sharded head (a DTensor parameter, fp32 master) with bf16 hidden states: `gathered_lm_heads`
    materialises it once, the loss casts it to the hidden dtype once (TRL's `_chunked_divergence_loss` rule), and
    the fp32 gradient flows back into the DTensor's shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from trl_sdx.lm_head import gathered_lm_heads

    x = _precision_inputs(21)
    owns_group = not dist.is_initialized()
    if owns_group:  # a one-process gloo group: enough for DTensors on CPU
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lm_head = torch.nn.Linear(HS, V)
                self.lm_head.weight = torch.nn.Parameter(distribute_tensor(x["weight"].clone(), mesh, [Shard(0)]))
                self.lm_head.bias = torch.nn.Parameter(distribute_tensor(x["bias"].clone(), mesh, [Shard(0)]))

            def get_output_embeddings(self):
                return self.lm_head

        model = Model()
        hidden = x["hidden"].bfloat16().requires_grad_()
        with gathered_lm_heads(model) as [(weight, bias)]:
            assert not isinstance(weight, DTensor) and weight.dtype == torch.float32
            loss = fused_eopd_loss_from_targets(hidden, weight, x["targets"], x["ids"], x["mask"], x["old"],
                                                student_bias=bias, tau=2.0, top_k=5, chunk_size=4)
        loss.backward()
        weight_grad = model.lm_head.weight.grad
        assert isinstance(weight_grad, DTensor) and weight_grad.dtype == torch.float32
        _check_against_reference(x, loss, hidden, x["weight"], x["bias"],
                                 (hidden.grad, weight_grad.full_tensor(), model.lm_head.bias.grad.full_tensor()),
                                 torch.bfloat16)
    finally:
        if owns_group:
            dist.destroy_process_group()


def test_bf16_weight_gradient_is_summed_across_chunks_in_fp32():
    """512 identical tokens in 512 one-row chunks: each adds grad/512 to the running sum. Summed in bf16 (8 bits)
    the sum stops growing near 2^8 terms; summed in fp32 it is the one-token gradient."""
    x = _precision_inputs(22)
    n = 512
    hidden = x["hidden"][:1, :1].expand(1, n, HS).bfloat16().contiguous().requires_grad_()
    weight = x["weight"].bfloat16().requires_grad_()
    ids, mask = x["ids"][:1, :1].expand(1, n).contiguous(), torch.ones(1, n)
    targets = score_teacher_targets(x["teacher_hidden"][:1, :1].expand(1, n, HT), x["teacher_weight"], ids, mask,
                                    top_k=5)
    # tau=0 and pi_old = the student: every token has an OPD and a forward-KL gradient
    loss = fused_eopd_loss_from_targets(hidden, weight, targets, ids, mask, tau=0.0, top_k=5, chunk_size=1)
    (grad_weight,) = torch.autograd.grad(loss, weight)
    one_token = TeacherTargets(*(t[:, :1] for t in targets))
    one = fused_eopd_loss_from_targets(hidden[:, :1].detach(), weight, one_token, ids[:, :1], mask[:, :1], tau=0.0,
                                       top_k=5)
    (grad_one,) = torch.autograd.grad(one, weight)
    assert grad_one.norm() > 0 and _rel_err(grad_weight, grad_one) < TOLERANCE[torch.bfloat16]


def test_teacher_targets_from_bf16_teacher():
    x = _precision_inputs(23)
    bf16 = score_teacher_targets(x["teacher_hidden"].bfloat16(), x["teacher_weight"].bfloat16(), x["ids"], x["mask"],
                                 top_k=5)
    fp32 = x["targets"]
    assert bf16.entropy.dtype == torch.float32 and bf16.topk_logprobs.dtype == torch.float32
    for name in ("entropy", "logprob"):
        assert _rel_err(getattr(bf16, name), getattr(fp32, name)) < TOLERANCE[torch.bfloat16], name


class _NoHostSync:
    """Fails any device-to-host read (`bool()`, `.item()`, `.tolist()`, `int()`, `float()`) inside the block."""

    NAMES = ("__bool__", "item", "tolist", "__int__", "__float__")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(name):
            def method(*args, **kwargs):
                raise AssertionError(f"host sync: Tensor.{name}")
            return method

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse(name))
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("compiled_shape_path", [False, True])
def test_student_loss_step_reads_nothing_back_from_the_device(monkeypatch, compiled_shape_path):
    """The trainer's loss step (`check_finite=False`, targets given) and its backward: no `.item()` / `bool()`;
    the verdict on the inputs stays a device flag (the valid-row selection's `nonzero` is the one sync left)."""
    if compiled_shape_path:  # the padded fixed-shape path, traced eagerly (see the bucket test above)
        monkeypatch.setattr(fused_module, "_get_step", lambda compiled: (
            lambda *args: fused_module._chunk_step(*args, functional=True)) if compiled else None)
    x = _precision_inputs(24)
    hidden, weight = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    with _NoHostSync():
        loss, stats = fused_eopd_loss_from_targets(hidden, weight, x["targets"], x["ids"], x["mask"], x["old"],
                                                   tau=2.0, top_k=5, chunk_size=4, compiled=compiled_shape_path,
                                                   return_stats=True, check_finite=False)
        (2.0 * loss).backward()
    assert bool(stats["inputs_finite"]) and weight.grad.abs().sum() > 0


def test_token_logprobs_skip_padding():
    """π_old at rollout time: computed on valid rows only (padding may hold anything), 0 there."""
    from trl_sdx.losses import token_logprobs

    x = make_inputs(25)
    hidden = x["student_hidden"].detach().clone()
    pad = x["mask"] == 0
    hidden[pad] = float("nan")
    got = token_logprobs(hidden, x["student_weight"], x["ids"], x["mask"], bias=x["student_bias"],
                         temperature=0.8, chunk_size=4)
    want = (logits(x["student_hidden"], x["student_weight"], x["student_bias"]).detach() / 0.8).log_softmax(-1)
    want = want.gather(-1, x["ids"][..., None]).squeeze(-1)
    torch.testing.assert_close(got[~pad], want[~pad])
    assert torch.all(got[pad] == 0)
