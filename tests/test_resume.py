"""Stop after a checkpoint, resume, and the next steps' losses equal an uninterrupted run's (same seed).

On-policy trainers sample their own rollouts, so this checks more than weights and optimizer state: the RNG
states restored from the checkpoint must reproduce the same generations.
"""

import pytest

from tiny_trainers import FACTORIES, logged_losses

STOP_AT, TOTAL = 2, 5


@pytest.mark.parametrize("method", sorted(FACTORIES))
def test_resume_reproduces_uninterrupted_losses(method, tmp_path):
    build = FACTORIES[method]
    straight = build(tmp_path / "straight", max_steps=TOTAL)
    straight.train()
    expected = logged_losses(straight)

    interrupted = build(tmp_path / "interrupted", max_steps=TOTAL, save_steps=STOP_AT)
    # Simulate the crash: train to the checkpoint only. max_steps stays TOTAL so the LR schedule is the same.
    interrupted.args.max_steps = TOTAL
    _train_until(interrupted, STOP_AT)
    checkpoint = tmp_path / "interrupted" / f"checkpoint-{STOP_AT}"
    assert checkpoint.is_dir()

    resumed = build(tmp_path / "interrupted", max_steps=TOTAL, save_steps=STOP_AT)
    if method == "mixsd":  # the targets are part of the run's state: reused, never regenerated
        assert resumed.mixsd_targets.from_cache and not interrupted.mixsd_targets.from_cache
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = logged_losses(resumed)
    for step in range(STOP_AT + 1, STOP_AT + 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), (step, got, expected)


def _train_until(trainer, step: int) -> None:
    """Run `trainer` and stop it right after the checkpoint at `step` is written (a clean kill)."""
    from transformers import TrainerCallback

    class StopAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True

    trainer.add_callback(StopAfterSave())
    trainer.train()
