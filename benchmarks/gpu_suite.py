"""The GPU suite: every speed and memory number of trl_sdx that users ask for, in one run of <= 7 minutes on one GPU.

Sections (each guarded: a failure is recorded and the rest still run; each time-boxed: what does not fit is recorded
as `skipped_for_time`, never dropped silently):
  loss_kernels    fwd+bwd of our losses (plain EOPD, fused EOPD eager/compiled, EOPD from teacher targets as the
                  trainer runs it, fused and Liger-based top-k KL) and the peers (TRL 1.16 chunked divergence, Liger
                  chunked JSD, Liger Triton fused linear JSD) at Qwen3 sizes (student hidden 2048, teacher 4096,
                  V 151,936), N in {4096, 16384, 32768} in a changing order
  eopd_trainer    EntropyAwareGKDTrainer vs trl.DistillationTrainer: 0.6B-shaped student, 1.7B-shaped teacher, bf16,
                  HF generation; default (compiled loss on CUDA) and eager loss; fp32 master weights under bf16 autocast
  sdzero_trainer  SDZeroTrainer (0.6B self-teacher; native and Liger-based loss) vs DistillationTrainer with a frozen
                  copy as teacher
  mixsd           MixSD target decoding tokens/s vs model.generate on the expert prompts, then MixSDTrainer vs
                  SFTTrainer SFT steps, then decoding with long expert contexts in both KV-cache layouts
  liger           the use_liger_kernel=True runs of all of the above, with their TRL peers
  fsdp2           EOPD, SD-Zero and DistillationTrainer under single-process FSDP2 (world size 1): the DTensor lm_head
                  path runs
Models are randomly initialised from Qwen3 configs (gpu_suite_setup.py); nothing is downloaded.

The kernels, the trainer sections and FSDP2 run in three worker processes (a crash, e.g. an illegal memory access,
ends only its worker; the remaining tasks go to a fresh one). Results stream to the console and are written to --out
as gpu_suite.json and gpu_suite.md.

  python benchmarks/gpu_suite.py --device cuda --out results/          # the GPU machine (see benchmarks/README.md)
  python benchmarks/gpu_suite.py --device cpu --tiny --out outputs/gpu_suite_tiny  # toy sizes: the CI test of the suite itself
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time

from _report import write_report  # benchmarks/ is on sys.path when a script runs
from gpu_suite_setup import QWEN3, TINY

HERE = os.path.dirname(os.path.abspath(__file__))

# Sizes per mode. "gpu": the issue's sizes; "tiny": the same code at toy sizes on CPU.
CONFIGS = {
    "gpu": {
        "vocab": 151936,
        # student = Qwen3-1.7B's hidden size (2048), teacher = Qwen3-8B's (4096)
        "kernels": dict(sizes=[4096, 16384, 32768], hidden_student=QWEN3["1.7B"]["hidden_size"],
                        hidden_teacher=QWEN3["8B"]["hidden_size"], vocab=151936,
                        dtype="bfloat16", chunk_size=1024, our_chunk_size=None, warmups=2, repeats=5),
        # 16 x 64 = 1024 completion tokens per step: HF generation (launch-bound, ~flat in batch) stays a few seconds
        "trainers": dict(batch=16, completion_len=64, prompt_words=64, warmup_steps=1, measured_steps=2,
                         gradient_checkpointing=True, mixsd_generation_batch=16, generation_repeats=3),
        # seconds; deadlines are cumulative from the start, so a section that finishes early leaves its time to the
        # next ones. 365 s + the last worker's grace + the wheel install stay inside 7 minutes.
        "budgets": {"loss_kernels": 115, "eopd_trainer": 70, "sdzero_trainer": 35, "mixsd": 50, "liger": 50,
                    "fsdp2": 45},
        "task_min_s": {"loss_kernels": 8, "default": 12},  # do not start a task with less time than this left
        "grace_s": 25,  # a worker still busy this long after its deadline is killed
    },
    "tiny": {
        "vocab": 512,
        # chunks of 64 rows: several chunks per size, one compiled shape
        "kernels": dict(sizes=[64, 256, 128], hidden_student=TINY["1.7B"]["hidden_size"],
                        hidden_teacher=TINY["8B"]["hidden_size"], vocab=2048,
                        dtype="float32", chunk_size=64, our_chunk_size=64, warmups=1, repeats=3),
        "trainers": dict(batch=2, completion_len=8, prompt_words=8, warmup_steps=1, measured_steps=1,
                         gradient_checkpointing=True, mixsd_generation_batch=4, generation_repeats=2),
        # generous: the CI test asserts that nothing is skipped, on a shared 2-core machine (~1 minute alone)
        "budgets": {"loss_kernels": 150, "eopd_trainer": 100, "sdzero_trainer": 60, "mixsd": 60, "liger": 30,
                    "fsdp2": 60},
        "task_min_s": {"loss_kernels": 1, "default": 1},
        "grace_s": 30,
    },
}
# Same-run ratio targets of issue 9 (full sizes only).
TARGETS = {"fused_eopd_ms_at_max_n": 180.0, "fused_eopd_gib_at_max_n": 3.0, "step_ratio": 1.10, "peak_ratio": 1.0,
           "mixsd_decoding_ratio": 0.75}  # issue 14: mixed decoding tokens/s >= 0.75x model.generate's


def plan() -> list[dict]:
    """Sections in run order, each with its tasks in priority order (what the time box cuts comes last);
    `compare_to` names the TRL peer at equal settings. Sections with the same `worker` share a worker process on the
    GPU. All `use_liger_kernel=True` runs are in the last section of the trainers' worker: Liger monkey-patches
    module-level functions of the model family, which would leak into every later task of that process."""
    kernels = ["fused_eopd", "liger_chunked_jsd", "trl_chunked_divergence", "fused_eopd_compiled",
               "fused_eopd_targets_compiled", "liger_triton_jsd", "fused_topk_kl", "liger_topk_kl",
               "fused_eopd_targets_student_only", "fused_eopd_targets", "plain_eopd"]
    t = lambda name, trainer, **kw: {"name": name, "trainer": trainer, **kw}  # noqa: E731
    trainers = {"module": "gpu_suite_trainers", "worker": "trainers"}
    return [
        {"name": "loss_kernels", "module": "gpu_suite_kernels", "worker": "kernels",
         "tasks": [{"name": m, "order_shift": i} for i, m in enumerate(kernels)]},
        {"name": "eopd_trainer", **trainers, "tasks": [
            t("distillation", "distillation"),
            t("eopd", "eopd", compare_to="distillation"),  # defaults: loss_compiled="auto" (compiled on CUDA)
            t("eopd_loss_eager", "eopd", config_overrides={"loss_compiled": "false"}, compare_to="distillation"),
            t("distillation_fp32_master", "distillation", fp32_master=True),
            t("eopd_fp32_master", "eopd", fp32_master=True, compare_to="distillation_fp32_master"),
        ]},
        {"name": "sdzero_trainer", **trainers, "tasks": [
            t("distillation_self_teacher", "distillation", teacher="self"),
            t("sdzero", "sdzero", compare_to="distillation_self_teacher"),
            t("sdzero_liger_loss", "sdzero", config_overrides={"loss_implementation": "liger"},
              compare_to="distillation_self_teacher"),
        ]},
        {"name": "mixsd", **trainers, "tasks": [
            t("target_generation", "mixsd_generation"),
            t("mixsd", "mixsd", compare_to="sft"),  # MixSD is SFT on its targets: the peer is SFTTrainer on them
            t("sft", "sft"),
            # expert prompts >= 4x / 16x the naive ones: either side of the `auto` layout rule's threshold here
            t("target_generation_long_context", "mixsd_generation", expert_ratios=[4, 16]),
        ]},
        {"name": "liger", **trainers, "tasks": [
            t("distillation_liger", "distillation", liger=True),
            t("eopd_liger", "eopd", liger=True, compare_to="distillation_liger"),
            t("distillation_self_teacher_liger", "distillation", teacher="self", liger=True),
            t("sdzero_liger", "sdzero", liger=True, compare_to="distillation_self_teacher_liger"),
            t("mixsd_liger", "mixsd", liger=True, compare_to="sft_liger"),
            t("sft_liger", "sft", liger=True),
        ]},
        {"name": "fsdp2", "module": "gpu_suite_trainers", "worker": "fsdp2", "distributed": True, "tasks": [
            t("eopd_fsdp2", "eopd", fsdp2=True, compare_to="distillation_fsdp2"),
            t("sdzero_fsdp2", "sdzero", fsdp2=True),
            t("distillation_fsdp2", "distillation", fsdp2=True),
        ]},
    ]


# ----------------------------------------------------------------------------------------------- worker side
def worker(plan_path: str, results_path: str) -> None:
    """Run the sections of one worker group in order (each task in order, until its section's deadline), appending
    one JSON line per event to `results_path`."""
    import importlib
    import traceback

    import torch

    from gpu_suite_setup import Meter

    with open(plan_path) as f:
        job = json.load(f)
    cfg = CONFIGS[job["mode"]]
    device = torch.device("cuda", 0) if job["device"] == "cuda" else torch.device("cpu")  # FSDP's LOCAL_RANK 0 too
    if device.type == "cpu" and job["mode"] == "tiny":
        torch.set_num_threads(1)  # toy tensors gain nothing from intra-op threads; a shared CI box loses a lot
    ctx = {"config": cfg, "meter": Meter(device), "tiny": job["mode"] == "tiny"}

    def emit(record):
        with open(results_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    for section in job["sections"]:
        if section.get("distributed"):  # a process group of one, as `accelerate launch --num_processes 1` sets up
            os.environ.update(section["distributed_env"])
            if device.type == "cpu":
                ctx["cpu_fsdp2"] = _allow_fsdp2_on_cpu()
        module = importlib.import_module(section["module"])
        ctx["deadline"] = section["deadline"]
        min_s = cfg["task_min_s"].get(section["name"], cfg["task_min_s"]["default"])
        print(f"== {section['name']} (worker pid {os.getpid()})", flush=True)
        for task in section["tasks"]:
            key = {"section": section["name"], "name": task["name"]}
            if time.time() + min_s > section["deadline"]:
                emit({"event": "result", **key, "result": {
                    "status": "skipped_for_time", "reason": f"less than {min_s} s left of the section's budget"}})
                print(f"  {task['name']}: skipped for time", flush=True)
                continue
            emit({"event": "start", **key})
            print(f"  {task['name']} ...", flush=True)
            start = time.perf_counter()
            try:
                result = module.run_task(task, ctx)
            except Exception as error:  # guarded: recorded, and the next task runs
                result = {"status": "error", "error": f"{type(error).__name__}: {error}"[:1000],
                          "traceback": traceback.format_exc()[-3000:]}
            ctx["meter"].release()  # outside `except`: the traceback no longer holds the failed task's tensors
            result["elapsed_s"] = time.perf_counter() - start
            emit({"event": "result", **key, "result": result})
            print(f"  {task['name']}: {_summary(result)}", flush=True)
            if device.type == "cuda" and _poisons_cuda(result.get("error", "")):
                print("  the CUDA context is unusable after this error: the next tasks go to a fresh worker",
                      flush=True)
                sys.stdout.flush()
                os._exit(EXIT_CUDA_POISONED)


# Errors after which every later CUDA call in the process fails: the driver continues in a fresh worker.
CUDA_FATAL = ("illegal memory access", "device-side assert", "CUDA error", "unspecified launch failure")
EXIT_CUDA_POISONED = 3


def _poisons_cuda(error: str) -> bool:
    return any(text in error for text in CUDA_FATAL)


def _allow_fsdp2_on_cpu() -> str | None:
    """accelerate enables FSDP only on accelerators; tests/cpu_fsdp2.py (the FSDP2 tests' switch) lets its FSDP2
    plugin run on CPU with gloo, so the CPU run goes through the same fully_shard / DTensor lm_head code as a GPU.
    Returns why not when that helper is missing (the runs are then DDP, and say so)."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    try:
        from cpu_fsdp2 import allow_fsdp2_on_cpu
    except ImportError as error:
        return f"tests/cpu_fsdp2.py is not importable ({error})"
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    allow_fsdp2_on_cpu()
    return None


def _summary(result: dict) -> str:
    status = result["status"]
    if status == "ok" and "step_s" in result:
        return f"ok, {result['step_s']:.3f} s/step, peak {result['peak_gib']:.2f} GiB"
    if status in ("error", "timed_out"):
        return f"{status}: {result.get('error', '')[:300]}"
    return status + (f" ({result['reason']})" if result.get("reason") else "")


# ----------------------------------------------------------------------------------------------- driver side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    for key in DISTRIBUTED_KEYS:  # only the distributed section sets these, for itself
        env.pop(key, None)
    return env


DISTRIBUTED_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _stream(proc, prefix: str, tail: collections.deque) -> None:
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        print(f"{prefix}{line}", flush=True)


def _read_events(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_group(args, sections: list[dict], workdir: str, name: str) -> dict:
    """Run a group of sections (each with its absolute "deadline") in worker processes until every task has a
    result: a worker that dies hands the rest of the tasks to a fresh one, a worker past the last deadline (+ grace)
    is killed. Returns {section: {task: result}}."""
    cfg = CONFIGS[args.mode]
    results: dict[tuple, dict] = {}
    all_keys = [(s["name"], t["name"]) for s in sections for t in s["tasks"]]
    attempt = 0
    while len(results) < len(all_keys):
        now = time.time()
        for section in sections:
            if now >= section["deadline"]:
                for task in section["tasks"]:
                    results.setdefault((section["name"], task["name"]), {
                        "status": "skipped_for_time", "reason": "the section's budget was spent"})
        pending = [dict(s, tasks=[t for t in s["tasks"] if (s["name"], t["name"]) not in results]) for s in sections]
        pending = [s for s in pending if s["tasks"]]
        if not pending:
            break
        attempt += 1
        plan_path = os.path.join(workdir, f"{name}.{attempt}.plan.json")
        events_path = os.path.join(workdir, f"{name}.{attempt}.events.jsonl")
        with open(plan_path, "w") as f:
            json.dump({"sections": pending, "mode": args.mode, "device": args.device}, f)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker-plan", plan_path, "--worker-results", events_path]
        tail: collections.deque = collections.deque(maxlen=40)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_worker_env(),
                                start_new_session=True)
        reader = threading.Thread(target=_stream, args=(proc, f"[{name}] ", tail), daemon=True)
        reader.start()
        killed = False
        try:
            proc.wait(timeout=max(1.0, pending[-1]["deadline"] + cfg["grace_s"] - time.time()))
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        running, finished = None, 0
        for event in _read_events(events_path):
            key = (event["section"], event["name"])
            if event["event"] == "start":
                running = key
            else:
                results[key] = event["result"]
                finished += 1
                running = None if running == key else running
        log_tail = "\n".join(tail)[-3000:]
        if running is not None:  # the worker died (or was killed) inside this task; the rest go to a fresh one
            results[running] = ({"status": "timed_out", "error": "still running at the deadline + "
                                 f"{cfg['grace_s']} s grace; the worker was killed", "log_tail": log_tail}
                                if killed else
                                {"status": "error", "error": f"the worker process died (exit code {proc.returncode})",
                                 "log_tail": log_tail})
        elif not finished:  # ended before any task (e.g. an import error): every pending task gets that, no retry
            for section in pending:
                for task in section["tasks"]:
                    results.setdefault((section["name"], task["name"]), {
                        "status": "error", "error": f"the worker exited with code {proc.returncode} before the task",
                        "log_tail": log_tail})
    return {s["name"]: {t["name"]: results[(s["name"], t["name"])] for t in s["tasks"]} for s in sections}


def _section_status(tasks: dict) -> str:
    statuses = {r["status"] for r in tasks.values()}
    if statuses & {"error", "timed_out"}:
        return "error"
    if statuses <= {"skipped_for_time"}:
        return "skipped_for_time"
    if "skipped_for_time" in statuses or "partial" in statuses:
        return "partial"
    return "ok"


# ----------------------------------------------------------------------------------------------- report
def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "liger-kernel", "accelerate", "peft", "triton", "trl_sdx"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# What the suite imports beyond torch/transformers/accelerate, and the wheel that brings it
# (../shared/gpu/fetch-wheels.sh on the GPU machine).
REQUIRED_MODULES = {"trl": "trl", "liger_kernel": "liger-kernel", "datasets": "datasets", "xxhash": "xxhash",
                    "dill": "dill", "multiprocess": "multiprocess", "math_verify": "math-verify", "peft": "peft",
                    "triton": "triton", "trl_sdx": "trl_sdx (pip install -e .)"}


def _missing_modules() -> list[str]:
    """Modules the workers will need that this Python cannot find (checked without importing them)."""
    import importlib.util

    return [f"{module} ({wheel})" for module, wheel in REQUIRED_MODULES.items()
            if importlib.util.find_spec(module) is None]


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _device_name(device: str) -> str:
    if device == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            return out.splitlines()[0] if out else "cuda"
        except (OSError, subprocess.SubprocessError):
            return "cuda"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def add_ratios(report: dict) -> None:
    """Same-run ratios: each trainer task vs its TRL peer; and, at full sizes, the issue's targets."""
    sections = report["sections"]
    for section_name, section in sections.items():
        for name, result in section["tasks"].items():
            peer_name = next((t.get("compare_to") for s in plan() if s["name"] == section_name for t in s["tasks"]
                              if t["name"] == name), None)
            peer = section["tasks"].get(peer_name) if peer_name else None
            if result.get("status") == "ok" and peer and peer.get("status") == "ok" and "step_s" in result:
                result["peer"] = peer_name
                result["step_ratio"] = result["step_s"] / peer["step_s"]
                result["peak_ratio"] = result["peak_gib"] / peer["peak_gib"] if peer["peak_gib"] > 0 else None
    if report["mode"] != "gpu":
        report["targets"] = {"note": "targets are evaluated at full sizes only"}
        return
    targets = {}
    kernels = sections.get("loss_kernels", {}).get("tasks", {})
    max_n = max(CONFIGS["gpu"]["kernels"]["sizes"])
    for method in ("fused_eopd", "fused_eopd_compiled", "fused_eopd_targets_compiled"):
        rows = [r for r in kernels.get(method, {}).get("rows", []) if r["n"] == max_n and not r["revisit"]
                and r["status"] == "ok"]
        if rows:
            targets[f"{method} N={max_n} <= {TARGETS['fused_eopd_ms_at_max_n']} ms"] = (
                rows[0]["median_ms"] <= TARGETS["fused_eopd_ms_at_max_n"])
            targets[f"{method} N={max_n} <= {TARGETS['fused_eopd_gib_at_max_n']} GiB"] = (
                rows[0]["peak_gib"] <= TARGETS["fused_eopd_gib_at_max_n"])
    ours = [m for m in kernels if m.startswith("fused_")]
    for method in ours:
        rows = kernels.get(method, {}).get("rows", [])
        if rows:
            targets[f"{method}: no crash, no recompilation after warm-up at any N"] = all(
                r["status"] == "ok" and not r.get("graphs_compiled_measured") for r in rows)
    generation = sections.get("mixsd", {}).get("tasks", {})
    for name, result in generation.items():
        decoding = [result] if "ratio_mixed_over_generate" in result else []
        decoding += [{"ratio_mixed_over_generate": r["ratio_over_generate"]["mixed_auto"], "row": row}
                     for row, r in result.get("rows", {}).items()]
        for r in decoding:
            label = f"{name}{' ' + r['row'] if 'row' in r else ''}"
            targets[f"{label}: mixed decoding >= {TARGETS['mixsd_decoding_ratio']}x model.generate"] = (
                r["ratio_mixed_over_generate"] >= TARGETS["mixsd_decoding_ratio"])
    for section in sections.values():
        for name, result in section["tasks"].items():
            if "step_ratio" in result:
                targets[f"{name} step <= {TARGETS['step_ratio']}x {result['peer']}"] = (
                    result["step_ratio"] <= TARGETS["step_ratio"])
                if result.get("peak_ratio") is not None:
                    targets[f"{name} peak <= {result['peer']}"] = result["peak_ratio"] <= TARGETS["peak_ratio"]
    report["targets"] = targets


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _cell(text: str, limit: int) -> str:
    """Free text (an error message) fit for one markdown table cell."""
    return text.replace("|", "/").replace("\n", " ")[:limit]


def _kernel_cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] == "ok":
        return f"{row['median_ms']:.1f} / {row['peak_gib']:.2f}"
    return row["status"] + (f": {_cell(row.get('error', ''), 80)}" if row["status"] == "error" else "")


def _status_cell(result: dict) -> str:
    text = "ok" if result["status"] == "ok" else _cell(_summary(result), 160)
    return text + (f" ({result['note']})" if result.get("note") else "")


OUR_CHUNKS = "at their trainers' defaults (EOPD: sized by V; SD-Zero: SDZeroConfig.loss_chunk_size)"


def to_markdown(report: dict) -> str:
    lines = [f"# GPU suite ({'tiny, ' if report['mode'] == 'tiny' else ''}{report['device_name']})", "",
             f"Command: `{report['command']}`", "",
             f"Date {report['date']}, commit {report['git_commit']}, wall time {report['wall_s']:.0f} s of a "
             f"{report['budget_s']:.0f} s budget. Versions: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + "."
             + (f" **Not installed: {', '.join(report['missing_modules'])}.**"
                if report.get("missing_modules") else ""),
             ""]
    kernels = report["sections"].get("loss_kernels")
    if kernels:
        cfg = report["config"]["kernels"]
        lines += ["## Loss kernels", "",
                  f"Loss + backward, {cfg['dtype']}, student hidden {cfg['hidden_student']}, teacher hidden "
                  f"{cfg['hidden_teacher']}, V {cfg['vocab']}, peers' chunk {cfg['chunk_size']} rows, ours "
                  f"{cfg['our_chunk_size'] or OUR_CHUNKS}; median of {cfg['repeats']} "
                  f"after {cfg['warmups']} warm-ups; GiB = peak above the inputs. Sizes are visited in the order "
                  "shown, then the first again (`revisit`); `graphs` = torch.compile graphs built during the "
                  "warm-ups / the measured calls of each visit.", "",
                  "| method | visit order | " + " | ".join(f"N={n} ms / GiB" for n in cfg["sizes"])
                  + " | revisit ms | graphs per visit | status |",
                  "|---|---|" + "---|" * len(cfg["sizes"]) + "---|---|---|"]
        for method, result in kernels["tasks"].items():
            rows = result.get("rows", [])
            by_n = {r["n"]: r for r in rows if not r["revisit"]}
            cells = [_kernel_cell(by_n.get(n)) for n in cfg["sizes"]]
            revisit = next((r for r in rows if r["revisit"]), None)
            graphs = ", ".join(f"{r.get('graphs_compiled_warmup', '?')}/{r.get('graphs_compiled_measured', '?')}"
                               for r in rows if r["status"] == "ok")
            lines.append(f"| {method} | {result.get('order', '')} | " + " | ".join(cells) + " | "
                         + (_fmt(revisit.get("median_ms"), ".1f") if revisit else "") + f" | {graphs} | "
                         + _cell(_summary(result), 120) + " |")
        lines.append("")
    lines += ["## Trainer steps", "",
              f"Batch {report['config']['trainers']['batch']}, completions of exactly "
              f"{report['config']['trainers']['completion_len']} tokens, prompts of "
              f"{report['config']['trainers']['prompt_words']} tokens + chat template, "
              f"{report['config']['trainers']['measured_steps']} measured optimizer steps after "
              f"{report['config']['trainers']['warmup_steps']}; peak = training-phase allocation peak above the "
              "process's memory before the task; rollout = generation + the rollout-time scoring inside the step. "
              "Ratios are against the TRL peer at equal settings in the same run.",
              "", "| section | task | s / step | rollout s | peak GiB | peer | step ratio | peak ratio | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for section_name, section in report["sections"].items():
        if section_name == "loss_kernels":
            continue
        for name, r in section["tasks"].items():
            if "tokens_per_s" in r or "rows" in r:  # decoding throughput: its own lines below
                continue
            lines.append(f"| {section_name} | {name} | {_fmt(r.get('step_s'), '.3f')} | "
                         f"{_fmt(r.get('rollout_s'), '.3f')} | {_fmt(r.get('peak_gib'), '.2f')} | "
                         f"{r.get('peer', '')} | {_fmt(r.get('step_ratio'), '.3f')} | "
                         f"{_fmt(r.get('peak_ratio'), '.3f')} | {_status_cell(r)} |")
    generation = report["sections"].get("mixsd", {}).get("tasks", {}).get("target_generation", {})
    if generation.get("status") == "ok":
        tps = generation["tokens_per_s"]
        lines += ["", f"MixSD target decoding: {tps['mixed_generate']:.0f} tokens/s vs `model.generate` "
                  f"{tps['model_generate']:.0f} tokens/s (batch {generation['batch']}, {generation['new_tokens']} new "
                  f"tokens, expert prompts, `{generation['layout']}` layout): ratio "
                  f"{generation['ratio_mixed_over_generate']:.2f}."]
    long_context = report["sections"].get("mixsd", {}).get("tasks", {}).get("target_generation_long_context", {})
    for name, r in long_context.get("rows", {}).items():
        ratio = r["ratio_over_generate"]
        lines.append(f"- {name} (naive / expert width {r['naive_tokens_max']} / {r['expert_tokens_max']}): mixed / "
                     f"generate {ratio['mixed_shared']:.2f}x `shared`, {ratio['mixed_split']:.2f}x `split`; "
                     f"`auto` picks `{r['auto_layout']}`.")
    lines += ["", "## Sections", "", "| section | status | budget s | seconds in tasks |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s['budget_s']:.0f} | {s['tasks_s']:.0f} |"
              for name, s in report["sections"].items()]
    if isinstance(report.get("targets"), dict) and "note" not in report["targets"]:
        lines += ["", "## Targets (issue 9)", "", "| target | met |", "|---|---|"]
        lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in report["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test of the suite)")
    parser.add_argument("--out", help="folder for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--budget-s", type=float, help="total seconds (default: the sum of the section budgets)")
    parser.add_argument("--sections", nargs="+", help="run only these sections (default: all)")
    parser.add_argument("--worker-plan", help=argparse.SUPPRESS)
    parser.add_argument("--worker-results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_plan:
        worker(args.worker_plan, args.worker_results)
        return None
    args.mode = "tiny" if args.tiny else "gpu"
    cfg = CONFIGS[args.mode]
    sections = [s for s in plan() if not args.sections or s["name"] in args.sections]
    unknown = set(args.sections or []) - {s["name"] for s in plan()}
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {[s['name'] for s in plan()]}")
    budgets = cfg["budgets"]
    total = args.budget_s or sum(budgets[s["name"]] for s in sections)
    scale = total / sum(budgets[s["name"]] for s in sections)
    started = time.time()
    out = os.path.abspath(args.out or os.path.join(HERE, "results", "gpu_suite"))
    os.makedirs(out, exist_ok=True)
    workdir = os.path.join(out, "workers")
    os.makedirs(workdir, exist_ok=True)
    report = {
        "suite": "gpu_suite", "mode": args.mode, "device": args.device,
        "command": "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_name": _device_name(args.device), "git_commit": _git_commit(), "versions": _versions(),
        "budget_s": total, "config": {k: v for k, v in cfg.items()}, "missing_modules": _missing_modules(),
        "sections": {},
    }
    if report["missing_modules"]:
        print(f"WARNING: not installed here: {report['missing_modules']}; the sections that import them will record "
              "the ImportError", flush=True)
    print(f"GPU suite ({args.mode}) on {report['device_name']}; budget {total:.0f} s; versions {report['versions']}",
          flush=True)
    deadline = started
    for section in sections:  # cumulative deadlines: time a section leaves over goes to the next ones
        deadline += budgets[section["name"]] * scale
        section["deadline"] = deadline
        if section.get("distributed"):
            section["distributed_env"] = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # On the GPU: one worker for the kernels, one for the trainer sections, one for FSDP2 (a process-group of its
    # own); a worker that dies hands its remaining tasks to a fresh one. --tiny runs everything in one worker
    # on CPU (start-up, i.e. imports, dominates toy sizes; Liger's patches need CUDA, so nothing leaks); the
    # distributed section comes last, its process group outlives it.
    groups = [[s for s in sections if s["worker"] == w] for w in dict.fromkeys(s["worker"] for s in sections)]
    if args.device == "cpu":
        groups = [sections]
    for group in groups:
        name = group[0]["worker"] if len(group) < len(sections) else "suite"
        group_start = time.time()
        print(f"== worker {name}: {[s['name'] for s in group]} (until +{group[-1]['deadline'] - started:.0f} s)",
              flush=True)
        for section_name, tasks in run_group(args, group, workdir, name).items():
            report["sections"][section_name] = {
                "status": _section_status(tasks), "budget_s": budgets[section_name] * scale,
                "tasks_s": sum(r.get("elapsed_s", 0.0) for r in tasks.values()), "tasks": tasks}
            print(f"== {section_name}: {report['sections'][section_name]['status']}", flush=True)
        print(f"== worker {name} done in {time.time() - group_start:.0f} s", flush=True)
        report["wall_s"] = time.time() - started
        add_ratios(report)
        write_report(report, os.path.join(out, "gpu_suite.json"), os.path.join(out, "gpu_suite.md"), to_markdown)
    print(to_markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
