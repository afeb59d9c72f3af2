"""The GPU suite (benchmarks/gpu_suite.py) runs end to end on CPU at toy sizes, so it cannot rot between GPU loans.

No timing is asserted: only that every section and every task produced a result (not an error), and that the JSON
and markdown reports are written. What cannot run on a CPU (Triton kernels) must say so, not fail."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_suite  # noqa: E402


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--device", "cpu", "--tiny",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "gpu_suite.md").is_file()
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text(), proc.stdout


def test_every_section_and_task_produced_results(tiny_report):
    report, _, log = tiny_report
    planned = {s["name"]: [t["name"] for t in s["tasks"]] for s in gpu_suite.plan()}
    assert list(report["sections"]) == list(planned)
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, {t: r.get("error") for t, r in section["tasks"].items()})
        assert list(section["tasks"]) == planned[name]
        for task, result in section["tasks"].items():
            # the only thing a CPU may not run is a CUDA-only kernel; it must say so
            assert result["status"] in ("ok", "unavailable"), (name, task, result)
            if result["status"] == "unavailable":
                assert "CUDA" in result["reason"], (name, task, result)
    assert "== fsdp2" in log  # printed as it goes
    assert report["missing_modules"] == []


def test_loss_kernels_visit_every_size_in_a_changing_order(tiny_report):
    report, _, _ = tiny_report
    sizes = report["config"]["kernels"]["sizes"]
    orders = set()
    for method, result in report["sections"]["loss_kernels"]["tasks"].items():
        if result["status"] == "unavailable":
            assert gpu_suite_kernels_needs_cuda(method)
            continue
        rows = result["rows"]
        assert sorted(r["n"] for r in rows if not r["revisit"]) == sorted(sizes)
        assert [r["n"] for r in rows if r["revisit"]] == [result["order"][0]]
        for row in rows:
            assert row["status"] == "ok" and row["median_ms"] > 0 and row["loss"] == row["loss"], (method, row)
        orders.add(tuple(result["order"]))
    assert len(orders) > 1  # methods do not all see the sizes in the same order


def gpu_suite_kernels_needs_cuda(method: str) -> bool:
    import gpu_suite_kernels

    return gpu_suite_kernels.METHODS[method][1]


def test_trainer_tasks_are_measured_against_their_peers(tiny_report):
    report, markdown, _ = tiny_report
    for section_name in ("eopd_trainer", "sdzero_trainer", "mixsd", "liger", "fsdp2"):
        for task, result in report["sections"][section_name]["tasks"].items():
            if result["status"] != "ok" or "step_s" not in result:
                continue
            assert result["step_s"] > 0 and result["peak_gib"] >= 0, (task, result)
    eopd = report["sections"]["eopd_trainer"]["tasks"]
    assert eopd["eopd"]["peer"] == "distillation" and eopd["eopd"]["step_ratio"] > 0
    assert eopd["eopd"]["completion_mean_length"] == report["config"]["trainers"]["completion_len"]
    assert report["sections"]["mixsd"]["tasks"]["mixsd"]["peer"] == "sft"
    assert report["sections"]["mixsd"]["tasks"]["target_generation"]["ratio_mixed_over_generate"] > 0
    for task in ("eopd_fsdp2", "sdzero_fsdp2"):  # really FSDP2 (accelerate's plugin on gloo), not a DDP run
        result = report["sections"]["fsdp2"]["tasks"][task]
        assert result["fsdp_enabled"] and result["lm_head_dtensor"], result
    for heading in ("## Loss kernels", "## Trainer steps", "## Sections"):
        assert heading in markdown


def test_gpu_report_evaluates_the_targets(tiny_report):
    """The GPU-only part of the report (the issue's targets) runs on the tiny results relabelled as a GPU run."""
    report = json.loads(json.dumps(tiny_report[0]))
    report["mode"] = "gpu"
    gpu_suite.add_ratios(report)
    targets = report["targets"]
    assert targets["eopd step <= 1.1x distillation"] in (True, False)
    assert targets["fused_eopd_compiled: no crash, no recompilation after warm-up at any N"] in (True, False)
    assert "## Targets (issue 9)" in gpu_suite.to_markdown(report)


def test_a_spent_budget_is_recorded_as_skipped_not_dropped(tmp_path):
    section = dict(gpu_suite.plan()[-1], deadline=time.time() - 1)
    args = type("Args", (), {"mode": "tiny", "device": "cpu"})()
    results = gpu_suite.run_group(args, [section], str(tmp_path), "late")
    tasks = results[section["name"]]
    assert [t["name"] for t in section["tasks"]] == list(tasks)
    assert {r["status"] for r in tasks.values()} == {"skipped_for_time"}
    assert gpu_suite._section_status(tasks) == "skipped_for_time"
    assert not os.listdir(tmp_path)  # no worker was started for it


def test_plan_peers_exist():
    for section in gpu_suite.plan():
        names = [t["name"] for t in section["tasks"]]
        assert len(names) == len(set(names))
        for task in section["tasks"]:
            assert task.get("compare_to") in (None, *names), task
        if any(task.get("liger") for task in section["tasks"]):  # Liger's patches leak: nothing may run after them
            assert section["name"] == "liger"
    trainer_sections = [s["name"] for s in gpu_suite.plan() if s["worker"] == "trainers"]
    assert trainer_sections[-1] == "liger"


CRASHING_MODULE = '''
import os


def run_task(task, ctx):
    if task["name"] == "dies":
        os._exit(7)  # like a segfault or an illegal memory access killing the worker
    return {"status": "ok"}
'''


def test_a_dying_worker_hands_the_rest_to_a_fresh_one(tmp_path, monkeypatch):
    (tmp_path / "suite_crash_probe.py").write_text(CRASHING_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    section = {"name": "probe", "module": "suite_crash_probe", "deadline": time.time() + 300,
               "tasks": [{"name": "before"}, {"name": "dies"}, {"name": "after"}]}
    args = type("Args", (), {"mode": "tiny", "device": "cpu"})()
    tasks = gpu_suite.run_group(args, [section], str(tmp_path), "probe")["probe"]
    assert tasks["before"]["status"] == "ok" and tasks["after"]["status"] == "ok"
    assert tasks["dies"]["status"] == "error" and "exit code 7" in tasks["dies"]["error"]
    assert gpu_suite._section_status(tasks) == "error"
