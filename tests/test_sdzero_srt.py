"""SD-Zero Phase 1 (SRT) end to end on a tiny model: collection + both SFT stages, resume, long rows, the saved
control phrases, CLI. The data rules themselves are tested on hand-built tuples in test_sdzero_srt_data.py."""

import json
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from trl_sdx.cli import main as cli_main
from trl_sdx.data import make_arithmetic_dataset
from trl_sdx.sdzero.srt import DONE_MARKER, SRTConfig, run_srt
from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

X = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


def parity_reward(completions, answer, **kwargs):
    """Correctness a random tiny model can reach (about half of the answers), through the real grading path."""
    return [float(len(c[0]["content"]) % 2) for c in completions]


class RecordStart(TrainerCallback):
    """The first weight of the model each SFT stage starts from."""

    def __init__(self):
        self.starts = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.starts.append(next(model.parameters()).detach().clone())


def _config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "srt"), num_train_epochs=1, per_device_train_batch_size=4, bf16=False,
                  use_cpu=True, report_to="none", save_strategy="no", init_max_new_tokens=6,
                  revision_max_new_tokens=6, num_init_samples=1, num_revisions=2, revise_correct=True,
                  stage2_size=2, max_revisions=None, learning_rate=1e-3, warmup_steps=0, seed=0, disable_tqdm=True)
    kwargs.update(overrides)
    return SRTConfig(**kwargs)


def test_phase1_collects_revisions_and_runs_both_stages(tmp_path, monkeypatch):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=0)
    initial = next(model.parameters()).detach().clone()
    config = _config(tmp_path)
    recorder = RecordStart()
    final = run_srt(model, tokenizer, make_arithmetic_dataset(6), config, reward_funcs=[parity_reward],
                    callbacks=[recorder])

    root = tmp_path / "srt"
    assert final == str(root / "stage2_revision")
    counts = json.loads((root / "revisions" / "counts.json").read_text())
    assert counts["problems"] == 6 and counts["init_samples"] == 6
    assert counts["revision_attempts"] == 2 * 6  # revise_correct: every y_init gets 2 revision samples
    assert counts["kept"] == counts["kept_from_incorrect"] + counts["kept_from_correct"] > 0
    revisions = Dataset.from_json(str(root / "revisions" / "revisions.jsonl"))
    assert len(revisions) == counts["kept"]
    for row in revisions:  # only verified-correct revisions, with the phrase of their y_init's reward
        assert parity_reward([[{"content": row["y_revised"]}]], None) == [1.0]
        assert parity_reward([[{"content": row["y_init"]}]], None) == [float(row["init_reward"])]
        assert row["control_phrase"] == (config.correct_phrase if row["init_reward"] else config.incorrect_phrase)

    # stage 1 starts from the given model, stage 2 from the stage-1 weights
    assert len(recorder.starts) == 2 and torch.equal(recorder.starts[0], initial)
    stage1 = AutoModelForCausalLM.from_pretrained(root / "stage1_generation")
    assert torch.equal(recorder.starts[1], next(stage1.parameters()))
    assert not torch.equal(recorder.starts[1], initial)
    for stage in ("stage1_generation", "stage2_revision"):
        assert (root / stage / DONE_MARKER).is_file() and (root / stage / "config.json").is_file()
        # the control phrases travel with theta_SRT, for Phase 2
        assert json.loads((root / stage / "sdzero_control_phrases.json").read_text()) == {
            "correct_phrase": config.correct_phrase, "incorrect_phrase": config.incorrect_phrase}
    split = json.loads((root / "revisions" / "sft_split.json").read_text())
    assert split["stage2_revision"] == 2 and split["stage1_generation"] == json.loads(
        (root / "stage1_generation" / DONE_MARKER).read_text())["examples"]

    # rerun: everything is finished, nothing is sampled or trained again
    monkeypatch.setattr("trl_sdx.sdzero.srt.collect_revisions", lambda *a, **k: pytest.fail("re-collected"))
    monkeypatch.setattr("trl_sdx.sdzero.srt.SFTTrainer.train", lambda *a, **k: pytest.fail("re-trained"))
    assert run_srt("not-a-model", tokenizer, make_arithmetic_dataset(6), config, reward_funcs=[parity_reward]) == final


def test_rerun_resumes_at_the_unfinished_stage(tmp_path, monkeypatch):
    tokenizer = make_tiny_tokenizer()
    config = _config(tmp_path)
    run_srt(make_tiny_model(tokenizer), tokenizer, make_arithmetic_dataset(4), config, reward_funcs=[parity_reward])
    root = tmp_path / "srt"
    (root / "stage2_revision" / DONE_MARKER).unlink()
    monkeypatch.setattr("trl_sdx.sdzero.srt.collect_revisions", lambda *a, **k: pytest.fail("re-collected"))
    recorder = RecordStart()
    run_srt("unused", tokenizer, make_arithmetic_dataset(4), config, reward_funcs=[parity_reward],
            callbacks=[recorder])
    stage1 = AutoModelForCausalLM.from_pretrained(root / "stage1_generation")
    assert len(recorder.starts) == 1 and torch.equal(recorder.starts[0], next(stage1.parameters()))


def test_no_kept_revision_is_a_clear_error(tmp_path):
    tokenizer = make_tiny_tokenizer()
    never = lambda completions, **kwargs: [0.0] * len(completions)  # noqa: E731
    with pytest.raises(ValueError, match="kept no verified revision"):
        run_srt(make_tiny_model(tokenizer), tokenizer, make_arithmetic_dataset(2), _config(tmp_path),
                reward_funcs=[never])


def test_empty_stage1_is_a_clear_error(tmp_path):
    tokenizer = make_tiny_tokenizer()
    with pytest.raises(ValueError, match="stage-1 \\(generation\\) set is empty.*`stage2_size` \\(100\\)"):
        run_srt(make_tiny_model(tokenizer), tokenizer, make_arithmetic_dataset(2), _config(tmp_path, stage2_size=100),
                reward_funcs=[parity_reward])


def test_config_rejects_unknown_stages(tmp_path):
    with pytest.raises(ValueError, match="srt_stages"):
        _config(tmp_path, srt_stages=["generation", "polish"])


def test_srt_cli_runs_offline_with_a_reward_import_path(tmp_path, monkeypatch):
    from trl_sdx.scripts import sdzero_srt
    from trl_sdx.testing import save_tiny_pair

    student, _ = save_tiny_pair(tmp_path / "models")
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def parity(completions, **kwargs):
            return [float(len(c[0]["content"]) % 2) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "cli-srt"
    args = sdzero_srt.make_parser().parse_args_and_config([
        "--model_name_or_path", student, "--dataset_name", "synthetic-arithmetic", "--synthetic_num_prompts", "4",
        "--reward_funcs", "my_rewards.parity", "--output_dir", str(out), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4", "--init_max_new_tokens", "6", "--revision_max_new_tokens", "6",
        "--num_revisions", "2", "--revise_correct", "--warmup_steps", "0", "--bf16", "false", "--use_cpu",
        "--report_to", "none",
        "--save_strategy", "no", "--stage2_size", "1", "--srt_stages", "generation", "--disable_tqdm", "true",
    ])
    sdzero_srt.main(*args)
    assert (out / "stage1_generation" / DONE_MARKER).is_file()
    assert not (out / "stage2_revision").exists()  # only the requested stage


def test_single_digit_demo_data_is_deterministic_and_gradeable():
    from trl_sdx.rewards import boxed_answer_reward
    from trl_sdx.sdzero.demo_data import make_single_digit_dataset

    data = make_single_digit_dataset(8, seed=3)
    assert data["prompt"] == make_single_digit_dataset(8, seed=3)["prompt"]
    for prompt, answer in zip(data["prompt"], data["answer"]):
        a, b = (int(t) for t in prompt[0]["content"].removeprefix("What is ").rstrip("?").split(" + "))
        assert answer == str(a + b) and 1 <= a <= 9 and 1 <= b <= 9
        assert boxed_answer_reward([[{"role": "assistant", "content": f"So \\boxed{{{a + b}}}"}]], [answer]) == [1.0]


@pytest.mark.parametrize("command", ["sdzero", "sdzero-srt"])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--model_name_or_path" in capsys.readouterr().out


def test_sdzero_cli_runs_offline(tmp_path):
    from trl_sdx.scripts import sdzero
    from trl_sdx.testing import save_tiny_pair

    student, _ = save_tiny_pair(tmp_path / "models")
    out = tmp_path / "cli-sdzero"
    args = sdzero.make_parser().parse_args_and_config([
        "--model_name_or_path", student, "--dataset_name", "synthetic-arithmetic", "--synthetic_num_prompts", "4",
        "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--max_completion_length", "6", "--bf16", "false", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1",
    ])
    assert args[1].teacher_mode == "auto"
    sdzero.main(*args)
    assert (out / "model.safetensors").is_file()


class RecordRowLengths(TrainerCallback):
    def __init__(self):
        self.lengths = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.lengths = sorted(len(ids) for ids in train_dataloader.dataset["input_ids"])


@pytest.mark.parametrize("policy", ["drop", "error"])
def test_rows_longer_than_max_length_are_dropped_with_a_count_or_raise(tmp_path, policy):
    from trl_sdx.sdzero.srt import _run_stage

    tokenizer = make_tiny_tokenizer()
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    completions = ["It is 5.", "Two plus three is five, so the answer is 5. " * 3, "long " * 200]
    rows = [{"prompt": user, "completion": [{"role": "assistant", "content": c}]} for c in completions]
    chat = lambda r: tokenizer.apply_chat_template(user + r["completion"], return_dict=True)["input_ids"]  # noqa: E731
    full = sorted(len(chat(r)) for r in rows)
    config = _config(tmp_path, max_length=full[1], long_rows=policy, max_steps=1)  # the longest row does not fit
    stage_dir = tmp_path / "stage"
    if policy == "error":
        with pytest.raises(ValueError, match="1 of 3 rows are longer than `max_length`"):
            _run_stage(make_tiny_model(tokenizer), tokenizer, Dataset.from_list(rows), config, "generation",
                       stage_dir, None, None)
        return
    recorder = RecordRowLengths()
    _run_stage(make_tiny_model(tokenizer), tokenizer, Dataset.from_list(rows), config, "generation", stage_dir,
               None, [recorder])
    marker = json.loads((stage_dir / DONE_MARKER).read_text())
    assert marker == {"examples": 3, "dropped_too_long": 1, "trained_on": 2}
    # the rows that fit are trained whole, never cut (SFT's own max_length would have truncated silently)
    assert [n - full[0] for n in recorder.lengths] in ([0, full[1] - full[0]], [1, full[1] - full[0] + 1])


@pytest.mark.parametrize("processes, expected", [(1, "unset"), (2, None)])
def test_models_load_without_device_map_auto_under_a_multi_process_launch(tmp_path, monkeypatch, processes,
                                                                          expected):
    """`device_map="auto"` (TRL's default on a GPU) would spread each process's copy over every GPU."""
    import trl_sdx.sdzero.srt as srt

    seen = {}
    monkeypatch.setattr(srt, "create_model_from_path", lambda path, **kwargs: seen.update(kwargs) or "model")
    monkeypatch.setattr(srt, "PartialState", lambda: type("State", (), {"num_processes": processes})())
    assert srt._load_model("some/path", _config(tmp_path, model_init_kwargs={"dtype": "float32"})) == "model"
    assert seen.get("device_map", "unset") == expected and seen["dtype"] == "float32"
