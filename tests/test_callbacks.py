"""Every run leaves metrics.jsonl, trainer_state.json, a PNG of its own curves and a model card naming the base."""

import json

import pytest

from tiny_trainers import build_entropy_gkd, build_mixsd, build_sdzero
from trl_sdx.callbacks import (
    METRICS_FILE,
    PLOT_FILE,
    STATE_FILE,
    SMOLLM2_HUB_ID,
    base_model_name,
    fix_model_card_base_model,
    plot_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("build", [build_entropy_gkd, build_sdzero, build_mixsd], ids=["eopd", "sdzero", "mixsd"])
def test_a_run_without_checkpoints_still_writes_metrics_state_and_plot(tmp_path, build):
    trainer = build(tmp_path, max_steps=2)  # save_strategy="no"
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    logged = [entry for entry in trainer.state.log_history]
    assert [entry["step"] for entry in lines] == [entry["step"] for entry in logged]
    assert lines[0]["loss"] == pytest.approx(logged[0]["loss"])
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["global_step"] == 2 and len(state["log_history"]) == len(logged)
    # The plot draws the method's own curves: each of them must actually be logged.
    train_logs = [entry for entry in logged if "loss" in entry]
    for name in trainer._plot_metrics:
        assert any(name in entry for entry in train_logs), name
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob("checkpoint-*"))  # nothing heavy was written


def test_plot_skips_missing_and_non_finite_values(tmp_path):
    history = [{"step": 1, "loss": 2.0, "eopd/fkl_gated": float("nan")}, {"step": 2, "loss": 1.5}]
    assert plot_training_curves([], ["loss"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    path = plot_training_curves(history, ["eopd/fkl_gated", "absent"], tmp_path / "p.png",
                                before_after={"kl": (3.0, 2.0)}, notes={"naive token share": 0.3})
    assert open(path, "rb").read(8) == PNG_MAGIC


def test_base_model_of_the_embedded_model_and_of_an_earlier_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_SDX_CACHE", str(tmp_path / "cache"))
    embedded = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    embedded.mkdir(parents=True)
    (tmp_path / "cache" / "models" / "smollm2-135m-instruct-half-depth").mkdir()
    assert base_model_name(str(embedded)) == SMOLLM2_HUB_ID
    assert base_model_name(str(embedded) + "-half-depth") == f"{SMOLLM2_HUB_ID} (half-depth copy)"
    assert base_model_name("Qwen/Qwen3-1.7B-Base") == "Qwen/Qwen3-1.7B-Base"  # a hub id, as given
    earlier_run = tmp_path / "stage2"
    earlier_run.mkdir()
    (earlier_run / "README.md").write_text("---\nbase_model: Qwen/Qwen3-4B\n---\n# card\n")
    assert base_model_name(str(earlier_run)) == "Qwen/Qwen3-4B"
    assert base_model_name(str(tmp_path)) is None  # an unknown local folder


def test_model_card_names_the_base_model_and_the_method(tmp_path, monkeypatch):
    trainer = build_entropy_gkd(tmp_path, max_steps=1)
    monkeypatch.setattr("trl_sdx.callbacks.base_model_name", lambda path: SMOLLM2_HUB_ID)
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "[None]" not in card and f"# Model Card for {tmp_path.name}" in card
    assert f"fine-tuned version of [{SMOLLM2_HUB_ID}](https://huggingface.co/{SMOLLM2_HUB_ID})" in card
    assert f"base_model: {SMOLLM2_HUB_ID}" in card
    assert "Entropy-Aware On-Policy Distillation of Language Models" in card and "2603.07079" in card


def test_model_card_of_an_unknown_local_model_names_the_folder(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\n---\nThis model is a fine-tuned version of "
                    "[None](https://huggingface.co/None).\n")
    (tmp_path / "my-model").mkdir()
    fix_model_card_base_model(card, str(tmp_path / "my-model"))
    assert f"fine-tuned version of the local model `{tmp_path / 'my-model'}`." in card.read_text()
