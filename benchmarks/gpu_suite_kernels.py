"""GPU suite, loss-kernel section: one loss + backward from the same inputs (student/teacher final hidden states and
lm_head weights, N completion tokens), ours and the peers', in one process.

Each task is one method; it visits the sizes in its own rotated order and then comes back to the first size once
more, counting the graphs torch.compile builds at each visit, so a kernel that recompiles (or crashes) whenever N
changes shows it. Per size: `warmups` untimed calls, one call for the memory peak (above the inputs, i.e. above what
is allocated just before the call), then the median of `repeats` timed calls.
"""

from __future__ import annotations

import statistics
import time
import traceback

import torch

from gpu_suite_setup import Meter, dynamo_graph_count, gib

EOPD_OPTIONS = dict(tau=0.8, alpha=1.0, top_k=16, clip_eps=0.2, temperature=1.0)  # paper defaults
TOPK_KL_OPTIONS = dict(kl_type="mixed", mixed_kl_weight=0.5, top_k=64, temperature=1.0)  # SD-Zero defaults

# name -> (what runs, needs CUDA). Ours run at the chunk size their trainer uses by default (EOPD: sized by the
# vocabulary; SD-Zero: `SDZeroConfig.loss_chunk_size`), the peers at the chunk size of ../shared/specs/anchors.md.
METHODS = {
    "plain_eopd": ("trl_sdx entropy_aware_opd_loss on full [N, V] logits", False),
    "fused_eopd": ("trl_sdx fused_entropy_aware_opd_loss, eager", False),
    "fused_eopd_compiled": ("trl_sdx fused_entropy_aware_opd_loss, compiled=True", False),
    "fused_eopd_targets": ("trl_sdx score_teacher_targets + fused_eopd_loss_from_targets (the trainer's path), "
                           "both inside the timed step, eager", False),
    "fused_eopd_targets_compiled": ("the same with compiled=True (the trainer's default on CUDA)", False),
    "fused_eopd_targets_student_only": ("fused_eopd_loss_from_targets, compiled=True, teacher targets scored once "
                                        "before the timed steps (the cost per optimizer step of a reused rollout)",
                                        False),
    "fused_topk_kl": ("trl_sdx fused_topk_distillation_loss (SD-Zero, top-64 mixed KL)", False),
    "liger_topk_kl": ("trl_sdx liger_topk_distillation_loss (SD-Zero loss on Liger's distillation base)", False),
    "trl_chunked_divergence": ("trl.kernels ChunkedDivergenceFunction, beta=1 (TRL 1.16)", False),
    "liger_chunked_jsd": ("Liger LigerFusedLinearJSDLoss(beta=1, compiled=True)", False),
    "liger_triton_jsd": ("Liger LigerFusedLinearJSD(jsd_beta=1), Triton", True),
}


def _inputs_for_size(weights, n: int, vocab: int, device, dtype, seed: int):
    """Hidden states, sampled ids and rollout log-probs for N tokens; scales give logits of std ~3, so the teacher's
    entropy lies on both sides of tau = 0.8 like a trained LM's."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hs, ht = weights["student_weight"].shape[1], weights["teacher_weight"].shape[1]
    x = dict(
        student_hidden=torch.randn(1, n, hs, device=device, dtype=dtype, generator=gen).requires_grad_(),
        teacher_hidden=torch.randn(1, n, ht, device=device, dtype=dtype, generator=gen),
        ids=torch.randint(0, vocab, (1, n), device=device, generator=gen),
        mask=torch.ones(1, n, device=device),
    )
    old = torch.empty(n, device=device, dtype=torch.float32)
    with torch.no_grad():  # log pi_old(y_t): the student's own, a little off-policy; in row chunks (no [N, V] at once)
        for start in range(0, n, 4096):
            logits = x["student_hidden"][0, start:start + 4096] @ weights["student_weight"].t()
            old[start:start + 4096] = logits.float().log_softmax(-1).gather(
                -1, x["ids"][0, start:start + 4096, None]).squeeze(-1)
            del logits
    x["old"] = (old + 0.1 * torch.randn(n, device=device, generator=gen))[None]
    return x


def _step_fn(method: str, w: dict, chunk_size: int, our_chunk_size: int | None):
    """A function of the per-size inputs that returns the scalar loss (backward is the caller's). Raises ImportError
    when the method's code is not on this checkout / machine."""
    sw, tw = w["student_weight"], w["teacher_weight"]
    if method == "plain_eopd":
        from trl_sdx.losses import entropy_aware_opd_loss

        def step(x):
            student_logits = x["student_hidden"] @ sw.t()
            with torch.no_grad():
                teacher_logits = x["teacher_hidden"] @ tw.t()
            return entropy_aware_opd_loss(student_logits, teacher_logits, x["ids"], x["mask"], x["old"],
                                          **EOPD_OPTIONS)
        return step
    if method in ("fused_eopd", "fused_eopd_compiled"):
        from trl_sdx.losses import fused_entropy_aware_opd_loss

        compiled = method.endswith("compiled")
        return lambda x: fused_entropy_aware_opd_loss(
            x["student_hidden"], sw, x["teacher_hidden"], tw, x["ids"], x["mask"], x["old"],
            chunk_size=our_chunk_size, compiled=compiled, **EOPD_OPTIONS)
    if method.startswith("fused_eopd_targets"):
        from trl_sdx.losses import fused_eopd_loss_from_targets, score_teacher_targets

        once, compiled = method.endswith("student_only"), method != "fused_eopd_targets"

        def targets(x):
            with torch.no_grad():
                return score_teacher_targets(x["teacher_hidden"], tw, x["ids"], x["mask"],
                                             top_k=EOPD_OPTIONS["top_k"], temperature=EOPD_OPTIONS["temperature"],
                                             chunk_size=our_chunk_size)

        def step(x):
            if once and "targets" not in x:  # scored at the first (warm-up) call, then reused like a rollout's
                x["targets"] = targets(x)
            return fused_eopd_loss_from_targets(
                x["student_hidden"], sw, x["targets"] if once else targets(x), x["ids"], x["mask"], x["old"],
                chunk_size=our_chunk_size, compiled=compiled, **EOPD_OPTIONS)
        return step
    if method == "liger_topk_kl":
        from trl_sdx.losses import liger_topk_distillation_loss

        return lambda x: liger_topk_distillation_loss(x["student_hidden"], sw, x["teacher_hidden"], tw, x["mask"],
                                                      chunk_size=our_chunk_size or _sdzero_chunk_size(),
                                                      **TOPK_KL_OPTIONS)
    if method == "fused_topk_kl":
        from trl_sdx.losses import fused_topk_distillation_loss

        return lambda x: fused_topk_distillation_loss(x["student_hidden"], sw, x["teacher_hidden"], tw, x["mask"],
                                                      chunk_size=our_chunk_size or _sdzero_chunk_size(),
                                                      **TOPK_KL_OPTIONS)
    if method == "trl_chunked_divergence":
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        def step(x):
            divergence, _entropy = ChunkedDivergenceFunction.apply(
                x["student_hidden"][0], sw, None, x["teacher_hidden"][0], tw, None, 1.0)
            return divergence.mean()
        return step
    if method == "liger_chunked_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(beta=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0, compiled=True,
                                          chunk_size=chunk_size)
        return lambda x: loss_fn(x["student_hidden"][0], sw, x["teacher_hidden"][0], tw, x["ids"][0])
    if method == "liger_triton_jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        loss_fn = LigerFusedLinearJSD(jsd_beta=1.0)
        return lambda x: loss_fn(x["student_hidden"][0], sw, x["teacher_hidden"][0], tw, None)
    raise ValueError(f"unknown loss-kernel method {method!r}; choose from {sorted(METHODS)}")


def _sdzero_chunk_size() -> int:
    """The chunk size SDZeroTrainer passes to its fused loss by default."""
    import dataclasses

    from trl_sdx.sdzero import SDZeroConfig

    return next(f.default for f in dataclasses.fields(SDZeroConfig) if f.name == "loss_chunk_size")


def _measure_size(step, x, w, meter: Meter, warmups: int, repeats: int) -> dict:
    def once():
        for t in (x["student_hidden"], w["student_weight"]):
            t.grad = None
        loss = step(x)
        loss.backward()
        return loss

    graphs_before = dynamo_graph_count()
    for _ in range(warmups):
        once()
    meter.sync()
    graphs_warm = dynamo_graph_count()
    for t in (x["student_hidden"], w["student_weight"]):
        t.grad = None
    meter.reset_peak()
    base = meter.allocated()
    loss = once()
    meter.sync()
    peak = meter.peak() - base
    times = []
    for _ in range(repeats):
        start = meter.now()
        once()
        times.append(meter.now() - start)
    graphs_after = dynamo_graph_count()
    row = {"status": "ok", "median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times],
           "peak_gib": gib(peak), "loss": float(loss.detach())}
    if graphs_before is not None:
        row["graphs_compiled_warmup"] = graphs_warm - graphs_before
        row["graphs_compiled_measured"] = graphs_after - graphs_warm  # > 0: it recompiles on calls of one shape
    return row


def _reset_compiler() -> None:
    """Each method starts from empty torch.compile caches: its own compilations are counted, and a peer whose
    compilation crashed (the Liger failure in ../shared/specs/anchors.md) leaves nothing behind for the next one."""
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception as error:  # a private API: a failure to reset is reported, not fatal
        print(f"    torch._dynamo.reset() failed: {error}", flush=True)


def run_task(task: dict, ctx: dict) -> dict:
    """One method over all sizes. Returns {"rows": [...]} with one row per (size visit)."""
    method, cfg, meter = task["name"], ctx["config"]["kernels"], ctx["meter"]
    device, dtype = meter.device, getattr(torch, cfg["dtype"])
    if METHODS[method][1] and device.type != "cuda":
        return {"status": "unavailable", "reason": "needs CUDA (Triton kernel)"}
    _reset_compiler()
    gen = torch.Generator(device=device).manual_seed(0)
    v, hs, ht = cfg["vocab"], cfg["hidden_student"], cfg["hidden_teacher"]
    w = {"student_weight": (torch.randn(v, hs, device=device, dtype=dtype, generator=gen) * 3.0 / hs**0.5)
         .requires_grad_(),
         "teacher_weight": torch.randn(v, ht, device=device, dtype=dtype, generator=gen) * 3.5 / ht**0.5}
    try:
        step = _step_fn(method, w, cfg["chunk_size"], cfg["our_chunk_size"])
    except ImportError as error:
        if not (error.name or "").startswith("trl_sdx"):
            raise  # a peer (TRL, Liger) that does not import is a broken install: an error, not "unavailable"
        return {"status": "unavailable", "reason": f"not on this checkout: {error}"}
    sizes = list(cfg["sizes"])
    shift = task["order_shift"] % len(sizes)
    order = sizes[shift:] + sizes[:shift]
    visits = [(n, False) for n in order] + [(order[0], True)]  # come back to the first size: must not recompile
    rows = []
    for n, revisit in visits:
        if time.time() > ctx["deadline"]:
            rows.append({"n": n, "revisit": revisit, "status": "skipped_for_time"})
            continue
        x = None
        try:
            x = _inputs_for_size(w, n, v, device, dtype, seed=n)
            repeats = 1 if revisit else cfg["repeats"]
            row = _measure_size(step, x, w, meter, warmups=0 if revisit else cfg["warmups"], repeats=repeats)
        except Exception as error:  # recorded per size: a crash at one N must not hide the others
            row = {"status": "error", "error": f"{type(error).__name__}: {error}"[:600],
                   "traceback": traceback.format_exc()[-1500:]}
        row.update(n=n, revisit=revisit)
        rows.append(row)
        del x
        w["student_weight"].grad = None
        meter.release()
        print(f"    {method:<32} N={n:<6}{' (revisit)' if revisit else '          '} " + (
            f"{row['median_ms']:9.1f} ms {row['peak_gib']:7.2f} GiB  graphs compiled "
            f"{row.get('graphs_compiled_warmup')}/{row.get('graphs_compiled_measured')}" if row["status"] == "ok"
            else row["status"] + (f": {row.get('error', '')[:200]}" if row["status"] == "error" else "")), flush=True)
    status = "ok" if all(r["status"] == "ok" for r in rows) else (
        "error" if any(r["status"] == "error" for r in rows) else "partial")
    return {"status": status, "description": METHODS[method][0], "order": order, "rows": rows}
