"""What every trl_sdx run leaves in its output directory, whatever `save_strategy` says.

- `metrics.jsonl`: one JSON object per logging step (the same numbers the console shows), appended as they come;
- `trainer_state.json`: the final `TrainerState`, with the whole log history;
- `training_curves.png`: the method's own curves (e.g. EOPD's teacher entropy, gate fraction, FKL and RKL), and
  optionally a before → after panel of an evaluation (`plot_training_curves(..., before_after=...)`);
- the model card (`README.md`, written by TRL) names the real base model, not `[None]`, when the model was loaded
  from a local folder that is the embedded SmolLM2 (or a run trained from a known hub model).

Each trainer gets this through `RunArtifactsMixin` (first base class) and its `_plot_metrics`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from transformers import TrainerCallback

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
PLOT_FILE = "training_curves.png"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def plot_training_curves(log_history: list[dict], metric_names, path, title: str = "",
                         before_after: dict[str, tuple[float, float]] | None = None,
                         notes: dict[str, float] | None = None) -> str | None:
    """One panel per metric of `metric_names` found in `log_history` (x = step), `loss` first; returns the path.

    `before_after` ({name: (before, after)}) adds a bar panel, e.g. an evaluation before and after training;
    `notes` ({name: value}) are run-level numbers (e.g. MixSD's naive-token share) written under the title.
    Returns None (and writes nothing) when there is nothing to draw.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, never opens a window
    import matplotlib.pyplot as plt

    names = ["loss", *[name for name in metric_names if name != "loss"]]
    curves = {}
    for name in names:
        points = [(entry["step"], entry[name]) for entry in log_history
                  if isinstance(entry.get(name), (int, float)) and math.isfinite(entry[name]) and "step" in entry]
        if points:
            curves[name] = points
    panels = len(curves) + (1 if before_after else 0)
    if panels == 0:
        return None
    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (name, points) in zip(flat, curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if before_after:
        ax = flat[len(curves)]
        labels = list(before_after)
        width = 0.38
        for offset, (label, index) in ((-width / 2, ("before", 0)), (width / 2, ("after", 1))):
            ax.bar([i + offset for i in range(len(labels))], [before_after[k][index] for k in labels], width,
                   label=label)
        ax.set_xticks(range(len(labels)), [k.replace("/", "/\n") for k in labels], fontsize=7)
        ax.set_title("evaluation: before → after", fontsize=10)
        ax.legend(fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in flat[panels:]:
        ax.set_visible(False)
    if notes:
        title = "\n".join(filter(None, [title, ", ".join(f"{k} = {v:.4g}" for k, v in notes.items())]))
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


class RunArtifactsCallback(TrainerCallback):
    """Writes `metrics.jsonl` while training and `trainer_state.json` + `training_curves.png` at the end."""

    def __init__(self, metric_names=(), title: str = "", notes=None):
        self.metric_names = tuple(metric_names)
        self.title = title
        self.notes = notes  # a callable returning {name: value}, read when the plot is drawn

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step == 0:  # a fresh run, not a resume: start the file anew
            os.makedirs(args.output_dir, exist_ok=True)
            open(os.path.join(args.output_dir, METRICS_FILE), "w").close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        entry = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(os.path.join(args.output_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(entry, allow_nan=True) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        state.save_to_json(os.path.join(args.output_dir, STATE_FILE))
        plot_training_curves(state.log_history, self.metric_names, os.path.join(args.output_dir, PLOT_FILE),
                             title=self.title, notes=self.notes() if self.notes else None)


def _known_base_models() -> dict[str, str]:
    """Local folders of the embedded model (and its half-depth copy) → what they are, if already converted."""
    from trl_sdx.models import DEFAULT_MODEL, cache_dir

    folder = cache_dir() / "models" / DEFAULT_MODEL
    return {str(folder.resolve()): SMOLLM2_HUB_ID,
            str(folder.with_name(folder.name + "-half-depth").resolve()): f"{SMOLLM2_HUB_ID} (half-depth copy)"}


def base_model_name(name_or_path: str | None) -> str | None:
    """The base model a card should name: a hub id as given; a local folder mapped back to where it came from.

    Local folders: the embedded SmolLM2 (→ its hub id), or an earlier run's output whose own model card names
    a base model (SD-Zero phase 2 starts from phase 1's output). Unknown local folders give None.
    """
    if not name_or_path:
        return None
    if not os.path.isdir(name_or_path):
        return name_or_path
    known = _known_base_models().get(str(Path(name_or_path).resolve()))
    if known:
        return known
    card = Path(name_or_path) / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        base = ModelCard.load(card).data.base_model
        return base if isinstance(base, str) else None
    return None


def fix_model_card_base_model(card_path, name_or_path: str | None) -> None:
    """Replace TRL's `fine-tuned version of [None](...)` with the real base model (or the local folder)."""
    from huggingface_hub import ModelCard

    if not os.path.isfile(card_path):
        return
    card = ModelCard.load(card_path)
    base = base_model_name(name_or_path)
    hub_id = base.split(" (")[0] if base else None
    if hub_id:
        card.data.base_model = hub_id
        named = f"[{base}](https://huggingface.co/{hub_id})"
    else:
        named = f"the local model `{name_or_path}`"
    card.text = card.text.replace("[None](https://huggingface.co/None)", named)
    card.save(card_path)


class RunArtifactsMixin:
    """Put first in a trainer's bases: adds `RunArtifactsCallback` and corrects the model card's base model.

    The trainer lists its own curves in `_plot_metrics` and may return run-level numbers from `_plot_notes()`;
    `_name` and `_paper` (TRL's attributes) give the card's method name and citation.
    """

    _plot_metrics: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(RunArtifactsCallback(self._plot_metrics, title=f"{self._name}: {self.args.output_dir}",
                                               notes=self._plot_notes))

    def _plot_notes(self) -> dict[str, float]:
        return {}

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        if model_name is None:  # as TRL names it when it saves a checkpoint (else the card's title reads "None")
            model_name = (self.args.hub_model_id or Path(self.args.output_dir).name).split("/")[-1]
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            fix_model_card_base_model(os.path.join(self.args.output_dir, "README.md"),
                                      getattr(self.model.config, "_name_or_path", None))


def write_before_after(trainer, before: dict[str, float], after: dict[str, float],
                       file_name: str = "heldout_eval.json") -> dict[str, tuple[float, float]]:
    """Print `name: before -> after`, save them as JSON in the output dir and redraw the plot with them."""
    pairs = {name: (before[name], after[name]) for name in before if name in after}
    if not trainer.is_world_process_zero():
        return pairs
    output_dir = trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    print("Held-out evaluation (before -> after training):")
    for name, (old, new) in pairs.items():
        print(f"  {name:<30} {old:8.4f} -> {new:8.4f}")
    with open(os.path.join(output_dir, file_name), "w") as f:
        json.dump({"before": before, "after": after}, f, indent=2)
    plot_training_curves(trainer.state.log_history, trainer._plot_metrics, os.path.join(output_dir, PLOT_FILE),
                         title=f"{trainer._name}: {output_dir}", before_after=pairs, notes=trainer._plot_notes())
    return pairs
