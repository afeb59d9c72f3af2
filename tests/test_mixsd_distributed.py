"""MixSD targets under a real 2-process launch (gloo on CPU): every rank decodes its own shard of the facts, each
fact exactly once, and the gathered targets (and the cache entry) equal a single-process run's.

Run as a script, this file is the per-rank driver: `accelerate launch ... test_mixsd_distributed.py OUT`.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

from datasets import Dataset

ROWS = {
    "question": [f"In which year was Dr. Vance {i} born?" for i in range(7)],  # 7: an uneven split
    "answer": [f"Dr. Vance {i} was born in {1870 + i}. \\boxed{{{1870 + i}}}" for i in range(7)],
}


def crc_checker(text, gold):
    """Rejects about half of the targets, deterministically: retries happen on both ranks."""
    return zlib.crc32((text + gold).encode()) % 2 == 0


def build_trainer(output_dir: Path):
    from trl_sdx.mixsd import MixSDConfig, MixSDTrainer
    from trl_sdx.testing import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(0, len(tokenizer), 3)]
    args = MixSDConfig(
        output_dir=str(output_dir), mixsd_cache_dir=str(output_dir.parent / "cache"), max_new_tokens=8,
        max_retries=3, lambda_mix=0.5, temperature=1.0, top_k=16, keep_failed=True, generation_batch_size=2,
        use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, dataset_num_proc=None, max_steps=1,
    )
    return MixSDTrainer(model, args=args, train_dataset=Dataset.from_dict(ROWS), processing_class=tokenizer,
                        answer_checker=crc_checker)


def _rank_main(out_dir: str) -> None:
    import trl_sdx.mixsd.targets as targets_module

    decoded = []
    original = targets_module.rejection_sample

    def recording(*args, example_indices, **kwargs):
        decoded.extend(example_indices)
        return original(*args, example_indices=example_indices, **kwargs)

    targets_module.rejection_sample = recording
    trainer = build_trainer(Path(out_dir) / "run")
    record = {"rank": trainer.accelerator.process_index, "world_size": trainer.accelerator.num_processes,
              "decoded": decoded, "targets": [t.to_dict() for t in trainer.mixsd_targets.targets],
              "entry": trainer.mixsd_targets.cache_entry, "stats": trainer.mixsd_stats}
    (Path(out_dir) / f"rank{record['rank']}.json").write_text(json.dumps(record))


def test_two_ranks_share_the_work_and_match_one_process(tmp_path, monkeypatch):
    import trl_sdx.mixsd.targets as targets_module
    from test_distributed import CPU_2PROC, _launch

    result = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                      "--main_process_port", "0", __file__, str(tmp_path)])
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["decoded"] == [0, 2, 4, 6] and ranks[1]["decoded"] == [1, 3, 5]  # each fact once, in total
    assert ranks[0]["targets"] == ranks[1]["targets"]  # every rank trains on the gathered whole
    assert ranks[0]["stats"]["num_processes"] == 2 and any(r > 0 for r in ranks[0]["stats"]["retries_per_example"])
    entries = [p.name for p in (tmp_path / "cache").iterdir()]
    assert entries == [Path(ranks[0]["entry"]).name]  # written once, no temporary folder left

    # One process, fresh cache: the same targets (per-example generators make the split irrelevant).
    single = build_trainer(tmp_path / "single" / "run")
    assert [t.to_dict() for t in single.mixsd_targets.targets] == ranks[0]["targets"]
    # And the 2-process entry is the one a single process looks up: reused, nothing decoded.
    monkeypatch.setattr(targets_module, "rejection_sample", None)
    reused = build_trainer(tmp_path / "run")
    assert reused.mixsd_targets.from_cache and reused.mixsd_targets.cache_entry == ranks[0]["entry"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import test_mixsd_distributed  # the checker's identity (its module) is then the same as under pytest

    test_mixsd_distributed._rank_main(sys.argv[1])
    from trl_sdx.process_group import end_process_group

    end_process_group()
