"""Peak memory and time of loss + backward for the loss kernels: ours (native), Liger's, and reference peers.

Methods (same inputs: student/teacher final hidden states and lm_head weights, N completion tokens), in groups;
each row's ratios are against its group's reference (the `ref` column):
  EOPD (reference plain_eopd; paper defaults tau=0.8, top-k 16, alpha=1, clip 0.2, old log-probs given)
    plain_eopd        `entropy_aware_opd_loss` on full logits (hidden @ W^T built by the caller, as a trainer does)
    fused_eopd        `fused_entropy_aware_opd_loss` (chunked, eager)
    fused_eopd_compiled  the same with compiled=True
    trl_gkd_beta1     TRL `GKDTrainer.generalized_jsd_loss(beta=1)` on full logits
    liger_jsd_beta1   Liger `LigerFusedLinearJSDLoss(beta=1, weight_hard_loss=0, weight_soft_loss=1)` (compiled=True)
  EOPD's student-only loss step, teacher targets scored beforehand (as the trainer does at rollout; not timed):
    fused_eopd_targets  `fused_eopd_loss_from_targets` (paper defaults): what the trainer runs per micro-batch
    fused_opd         the same with tau=inf: only the PPO-clipped sampled-token (OPD) term; reference of this group
    liger_opd         the OPD term from Liger's selective log-prob (`fused_linear_ppo._ChunkedSelectiveLogProbFunction`:
                      streams log pi(y_t) over vocabulary chunks, recomputes the logits in backward), the piece of
                      Liger's PPO base that fits EOPD
  log pi(y_t) without gradient (pi_old at rollout time; forward only, reference token_logprobs):
    token_logprobs    `trl_sdx.losses.token_logprobs` (chunked over rows)
    liger_token_logprobs  Liger's `_selective_logprob_forward` (rows x vocabulary chunks)
  SD-Zero top-k KL (reference plain_topk; k=64, mixed, w=0.5) -- the `loss_implementation` switch
    plain_topk        `topk_distillation_loss` on full logits
    fused_topk        `fused_topk_distillation_loss` (native chunked, eager): loss_implementation="native"
    liger_topk        `liger_topk_distillation_loss` (on Liger's LigerFusedLinearDistillationBase, eager):
                      loss_implementation="liger"

Every (method, N) runs in a fresh subprocess so one method's allocations cannot influence another's.
Peak memory is "above the inputs": the increase of the peak over the memory held just before the measured
call (inputs + weights + everything the warm-ups left, e.g. compiled code), for one loss + backward.
  * cuda: torch.cuda.reset_peak_memory_stats(), max_memory_allocated() - memory_allocated() before the call.
  * cpu:  torch has no CPU allocator statistics, so the process's resident set is used: the peak RSS
          (VmHWM in /proc/self/status) is reset by writing "5" to /proc/self/clear_refs right before the
          measured call and read after it. glibc is told to serve every allocation >= 64 KiB with mmap
          (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the RSS at once and RSS tracks live tensors.
Time: median of `--repeats` timed calls after `--warmups` untimed ones (cuda: synchronised).

Examples:
  python benchmarks/loss_kernels.py --device cpu --out benchmarks/results/loss_kernels_cpu.json \
      --markdown benchmarks/results/loss_kernels_cpu.md
  python benchmarks/loss_kernels.py --device cpu --sizes 256 --vocab 4096 --hidden-student 256 \
      --hidden-teacher 256 --repeats 2 --warmups 1          # quick smoke run
  python benchmarks/loss_kernels.py --device cuda           # Qwen3 sizes, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from _report import write_report  # benchmarks/ is on sys.path when a script runs

METHODS = ("plain_eopd", "fused_eopd", "fused_eopd_compiled", "trl_gkd_beta1", "liger_jsd_beta1",
           "fused_eopd_targets", "fused_opd", "liger_opd", "token_logprobs", "liger_token_logprobs", "plain_topk",
           "fused_topk", "liger_topk")
# Each method's ratios are against this reference, measured in the same run.
REFERENCE = {"fused_eopd_targets": "fused_opd", "fused_opd": "fused_opd", "liger_opd": "fused_opd",
             "token_logprobs": "token_logprobs", "liger_token_logprobs": "token_logprobs",
             "plain_topk": "plain_topk", "fused_topk": "plain_topk", "liger_topk": "plain_topk"}
FORWARD_ONLY = ("token_logprobs", "liger_token_logprobs")
DEFAULTS = {
    "cpu": dict(sizes=[2048], hidden_student=1024, hidden_teacher=1024, vocab=32768, dtype="float32", chunk_size=256),
    "cuda": dict(sizes=[4096, 16384, 32768], hidden_student=2048, hidden_teacher=4096, vocab=151936, dtype="bfloat16",
                 chunk_size=1024),
}
EOPD_OPTIONS = dict(tau=0.8, alpha=1.0, top_k=16, clip_eps=0.2, temperature=1.0)
TOPK_OPTIONS = dict(kl_type="mixed", mixed_kl_weight=0.5, top_k=64, temperature=1.0)


def reference_of(method: str) -> str:
    return REFERENCE.get(method, "plain_eopd")


# ----------------------------------------------------------------------------------------------- worker side
def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _make_inputs(torch, args, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, hs, ht, v = args.n, args.hidden_student, args.hidden_teacher, args.vocab

    def randn(*shape, std):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    # Scales give logits with std ~3: teacher entropies on both sides of tau=0.8, like a trained LM.
    inputs = dict(
        student_hidden=randn(1, n, hs, std=1.0).requires_grad_(),
        student_weight=randn(v, hs, std=3.0 / hs**0.5).requires_grad_(),
        teacher_hidden=randn(1, n, ht, std=1.0),
        teacher_weight=randn(v, ht, std=3.5 / ht**0.5),
        ids=torch.randint(0, v, (1, n), generator=gen).to(device),
        mask=torch.ones(1, n, device=device),
    )
    with torch.no_grad():  # old log-probs: the student's at rollout time, a little off-policy
        logits = inputs["student_hidden"][0] @ inputs["student_weight"].t()
        old = logits.float().log_softmax(-1).gather(-1, inputs["ids"][0][:, None]).squeeze(-1)
        del logits
        inputs["old"] = (old + 0.1 * torch.randn(n, generator=gen).to(device))[None]
    return inputs


def _make_step(torch, method, x, args):
    from trl_sdx.losses import entropy_aware_opd_loss, fused_entropy_aware_opd_loss

    if method == "plain_eopd":
        def step():
            student_logits = x["student_hidden"] @ x["student_weight"].t()
            with torch.no_grad():
                teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].t()
            return entropy_aware_opd_loss(student_logits, teacher_logits, x["ids"], x["mask"], x["old"], **EOPD_OPTIONS)
    elif method in ("fused_eopd", "fused_eopd_compiled"):
        def step():
            return fused_entropy_aware_opd_loss(
                x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["ids"],
                x["mask"], x["old"], chunk_size=args.chunk_size, compiled=method.endswith("compiled"),
                **EOPD_OPTIONS)
    elif method == "trl_gkd_beta1":
        from trl.experimental.gkd import GKDTrainer

        def step():
            student_logits = x["student_hidden"] @ x["student_weight"].t()
            with torch.no_grad():
                teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].t()
            return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=x["ids"], beta=1.0)
    elif method == "liger_jsd_beta1":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(beta=1.0, weight_hard_loss=0.0, weight_soft_loss=1.0, compiled=True,
                                          chunk_size=args.chunk_size)

        def step():
            return loss_fn(x["student_hidden"][0], x["student_weight"], x["teacher_hidden"][0], x["teacher_weight"],
                           x["ids"][0])
    elif method in ("fused_eopd_targets", "fused_opd", "liger_opd", "token_logprobs", "liger_token_logprobs"):
        step = _student_only_step(torch, method, x, args)
    elif method in ("plain_topk", "fused_topk", "liger_topk"):
        step = _topk_step(torch, method, x, args)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return step


def _student_only_step(torch, method, x, args):
    """EOPD's per-micro-batch step with the teacher scored beforehand (untimed), and pi_old at rollout."""
    from liger_kernel.chunked_loss.fused_linear_ppo import (
        _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE,
        _ChunkedSelectiveLogProbFunction,
        _selective_logprob_forward,
    )

    from trl_sdx.losses import fused_eopd_loss_from_targets, score_teacher_targets, token_logprobs

    ids, mask, old = x["ids"], x["mask"], x["old"]
    if method == "token_logprobs":
        return lambda: token_logprobs(x["student_hidden"].detach(), x["student_weight"].detach(), ids, mask,
                                      chunk_size=args.chunk_size).sum()
    if method == "liger_token_logprobs":
        return lambda: _selective_logprob_forward(x["student_hidden"][0].detach(), x["student_weight"].detach(),
                                                  ids[0])[0].sum()
    targets = score_teacher_targets(x["teacher_hidden"], x["teacher_weight"], ids, mask,
                                    top_k=EOPD_OPTIONS["top_k"], chunk_size=args.chunk_size)
    options = {k: v for k, v in EOPD_OPTIONS.items() if k != "temperature"}
    if method == "fused_eopd_targets":
        return lambda: fused_eopd_loss_from_targets(x["student_hidden"], x["student_weight"], targets, ids, mask, old,
                                                    chunk_size=args.chunk_size, **options)
    if method == "fused_opd":
        return lambda: fused_eopd_loss_from_targets(x["student_hidden"], x["student_weight"], targets, ids, mask, old,
                                                    chunk_size=args.chunk_size, **{**options, "tau": float("inf")})
    # liger_opd: max(-A r, -A clip(r, 1-eps, 1+eps)), A = log pi_T(y) - log pi_old(y), r = pi_theta(y) / pi_old(y),
    # token-mean; written here on log-probs for this peer (the library's one copy is `eopd_token_terms`).
    eps, teacher_logp, old_rows = EOPD_OPTIONS["clip_eps"], targets.logprob[0], old[0].float()

    def step():
        logp = _ChunkedSelectiveLogProbFunction.apply(
            x["student_hidden"][0], x["student_weight"], ids[0], None, 1.0, _SELECTIVE_LOGPROB_VOCAB_CHUNK_SIZE)
        advantage = teacher_logp - old_rows
        ratio = torch.exp(logp - old_rows)
        return torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - eps, 1 + eps)).mean()

    return step


def _topk_step(torch, method, x, args):
    from trl_sdx.losses import fused_topk_distillation_loss, liger_topk_distillation_loss, topk_distillation_loss

    if method == "plain_topk":
        def step():
            student_logits = x["student_hidden"] @ x["student_weight"].t()
            with torch.no_grad():
                teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].t()
            return topk_distillation_loss(student_logits, teacher_logits, x["mask"], **TOPK_OPTIONS)
        return step
    loss_fn = fused_topk_distillation_loss if method == "fused_topk" else liger_topk_distillation_loss

    def step():
        return loss_fn(x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], x["mask"],
                       chunk_size=args.chunk_size, **TOPK_OPTIONS)
    return step


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = _make_inputs(torch, args, device, dtype)
    step = _make_step(torch, args.worker, x, args)

    def run_once():
        for p in (x["student_hidden"], x["student_weight"]):
            p.grad = None
        loss = step()
        if args.worker not in FORWARD_ONLY:
            loss.backward()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmups):
        run_once()
    sync()
    for p in (x["student_hidden"], x["student_weight"]):
        p.grad = None

    # memory of one call
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = run_once()
        sync()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_mib("VmRSS")
        loss = run_once()
        peak_mib = _rss_mib("VmHWM") - base

    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        run_once()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"method": args.worker, "n": args.n, "loss": float(loss), "peak_mib": peak_mib,
            "median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times],
            # CPU time of the process (all threads): less sensitive than wall time to other jobs on a shared host
            "median_cpu_ms": 1000 * statistics.median(cpu_times), "load_avg_1min": os.getloadavg()[0]}


# ----------------------------------------------------------------------------------------------- driver side
def run_one(args, method: str, n: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--n", str(n)]
    for name in ("device", "hidden_student", "hidden_teacher", "vocab", "dtype", "chunk_size", "repeats", "warmups",
                 "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"method": method, "n": n, "error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def to_markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"# Loss kernels on {cfg['device']} ({report['machine']})",
        "",
        f"Date: {report.get('date', 'not recorded')}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Student hidden {cfg['hidden_student']}, teacher hidden {cfg['hidden_teacher']}, vocab {cfg['vocab']}, "
        f"{cfg['dtype']}, chunk size {cfg['chunk_size']}, torch threads {cfg['threads'] or 'default'}; "
        f"loss + backward; median of {cfg['repeats']} runs after "
        f"{cfg['warmups']} warm-ups; peak memory above the inputs ({report['memory_method']}). "
        "Ratios are relative to the `ref` method at the same N (module docstring). CPU ms is the process CPU time "
        "(all threads); `load avg` is the host's 1-minute load average when the method finished.",
        "",
        "| N | method | ref | wall ms | CPU ms | peak MiB | wall / ref | CPU / ref | memory / ref | load avg | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for row in report["results"]:
        if "error" in row:
            lines.append(f"| {row['n']} | {row['method']} | | error: {row['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {row['n']} | {row['method']} | {reference_of(row['method'])} | {row['median_ms']:.0f} | "
            f"{row['median_cpu_ms']:.0f} | "
            f"{row['peak_mib']:.0f} | {row.get('time_vs_ref', nan):.2f} | {row.get('cpu_time_vs_ref', nan):.2f} | "
            f"{row.get('memory_vs_ref', nan):.3f} | {row['load_avg_1min']:.1f} | {row['loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of completion tokens N (default per device)")
    parser.add_argument("--hidden-student", type=int)
    parser.add_argument("--hidden-teacher", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--chunk-size", type=int, help="rows per chunk for the fused/Liger methods")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads in each worker (0: torch's default). On a CPU host shared with "
                             "other jobs, 1 avoids OpenMP threads waiting on descheduled peers at every op")
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--markdown", help="write a markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for n in args.sizes:
        rows = [run_one(args, method, n) for method in args.methods]
        ok = {r["method"]: r for r in rows if "error" not in r}
        for row in rows:
            ref = ok.get(reference_of(row["method"]))
            if ref is not None and "error" not in row:
                row["time_vs_ref"] = row["median_ms"] / ref["median_ms"]
                row["cpu_time_vs_ref"] = row["median_cpu_ms"] / ref["median_cpu_ms"]
                row["memory_vs_ref"] = row["peak_mib"] / ref["peak_mib"]
            print(json.dumps(row), flush=True)
        results.extend(rows)
    import torch

    report = {
        "command": "python benchmarks/loss_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "memory_method": ("torch.cuda max_memory_allocated" if args.device == "cuda" else
                          "peak RSS via /proc/self/clear_refs + VmHWM, fresh process per method"),
        "config": {k: getattr(args, k) for k in ("device", "sizes", "hidden_student", "hidden_teacher", "vocab",
                                                  "dtype", "chunk_size", "repeats", "warmups", "threads")},
        "eopd_options": EOPD_OPTIONS,
        "topk_options": TOPK_OPTIONS,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
    }
    write_report(report, args.out, args.markdown, to_markdown)


if __name__ == "__main__":
    main()
