"""Teacher sync for SD-Zero's iterative self-evolution: after a round saturates, the teacher becomes the student.

Two layouts, both hard copies (no EMA):

- a separate teacher module (`teacher_mode` 'separate' or 'copy'): the student's weights, with any LoRA update folded
  in, are copied into it tensor by tensor;
- the adapter-disabled teacher (`teacher_mode='disable_adapter'`): the teacher IS the base weights, so the LoRA update
  is merged into them and the adapter reset to zero. The student's function is unchanged (W + BA = (W + BA) + 0)
  while the adapter-disabled forward now gives the current student.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import TrainerCallback

from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper


def _active_adapters(module) -> list[str]:
    adapters = module.active_adapters if hasattr(module, "active_adapters") else [module.active_adapter]
    owned = set(getattr(module, "lora_A", {})) | set(getattr(module, "lora_embedding_A", {}))
    return [name for name in adapters if name in owned]


def merged_student_tensors(student) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the student's effective weights, named like the plain (non-PEFT) model's parameters.

    For a PeftModel: LoRA layers yield W + sum_a delta_a, `modules_to_save` yield the trained copy, and adapter
    parameters themselves are skipped. Nothing of the student is modified.
    """
    if not isinstance(student, PeftModel):
        yield from ((name, param.detach()) for name, param in student.named_parameters())
        return
    base = student.get_base_model()
    handled: set[str] = set()
    for path, module in base.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, LoraLayer):
            base_layer = module.get_base_layer()
            weight = base_layer.weight.detach()
            for adapter in _active_adapters(module):
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            yield prefix + "weight", weight
            handled.add(prefix + "base_layer.weight")
            if getattr(base_layer, "bias", None) is not None:
                yield prefix + "bias", base_layer.bias.detach()
                handled.add(prefix + "base_layer.bias")
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[module.active_adapter]
            for name, param in trained.named_parameters():
                yield prefix + name, param.detach()
            handled.update(prefix + "original_module." + name for name, _ in module.original_module.named_parameters())
            handled.update(prefix + "modules_to_save." + name for name, _ in module.modules_to_save.named_parameters())
    for name, param in base.named_parameters():
        if name in handled or "lora_" in name:
            continue
        yield name, param.detach()


def check_syncable(student, teacher) -> None:
    """A hard copy needs the teacher to have exactly the student's parameter names and shapes."""
    source = {name: tuple(t.shape) for name, t in merged_student_tensors(student)}
    target = {name: tuple(p.shape) for name, p in teacher.named_parameters()}
    if source != target:
        missing = sorted(set(source) ^ set(target))[:5]
        shapes = sorted(n for n in set(source) & set(target) if source[n] != target[n])[:5]
        raise ValueError(
            "`teacher_sync_steps` > 0 copies the student into the teacher, but their architectures differ "
            f"(names only on one side: {missing}; different shapes: {shapes}). Use a teacher with the student's "
            "architecture (e.g. `teacher_mode='copy'`), or set `teacher_sync_steps=0`."
        )


def _is_dtensor(tensor) -> bool:
    return isinstance(tensor, DTensor)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 (DTensor) shard is gathered; a collective, so every process must call it."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


@torch.no_grad()
def _assign(target: torch.Tensor, source: torch.Tensor) -> None:
    """target <- source, whichever of them is an FSDP2 shard (DTensor). Same layout: a local copy per process."""
    source = source.to(dtype=target.dtype)
    if _is_dtensor(target):
        if _is_dtensor(source):
            if source.placements != target.placements or source.device_mesh != target.device_mesh:
                source = source.redistribute(target.device_mesh, target.placements)
        else:  # the same full tensor on every process: each keeps its own slice, nothing is sent
            source = distribute_tensor(source.to(target.device), target.device_mesh, target.placements,
                                       src_data_rank=None)
        target.copy_(source)
    else:
        target.copy_(_full(source).to(target.device))


@torch.no_grad()
def copy_student_into_teacher(student, teacher) -> None:
    """teacher <- student (hard copy of the effective weights, LoRA folded in). Under FSDP2 both models are sharded
    the same way (same architecture, same wrap policy), so each process copies its own shards."""
    params = dict(teacher.named_parameters())
    for name, tensor in merged_student_tensors(student):
        _assign(params[name], tensor)


@torch.no_grad()
def merge_and_reset_lora(peft_model) -> None:
    """Fold the active LoRA update into the base weights and zero the adapter (B = 0), keeping the student's function.

    Afterwards the adapter-disabled model equals the current student: that is the teacher sync when the teacher is
    the base weights. Only weight-based LoRA without DoRA can be folded like this (checked by `check_mergeable`).
    """
    for module in peft_model.get_base_model().modules():
        if isinstance(module, LoraLayer):
            base_layer = module.get_base_layer()
            for adapter in _active_adapters(module):
                base_layer.weight.add_(module.get_delta_weight(adapter).to(base_layer.weight.dtype))
                module.lora_B[adapter].weight.zero_()
        elif isinstance(module, ModulesToSaveWrapper):
            module.original_module.load_state_dict(module.modules_to_save[module.active_adapter].state_dict())


def check_mergeable(peft_model) -> None:
    """Raise unless `merge_and_reset_lora` can sync this PEFT model's adapter-disabled teacher."""
    for name, config in peft_model.peft_config.items():
        if str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
            raise ValueError(
                f"`teacher_sync_steps` with `teacher_mode='disable_adapter'` merges a LoRA adapter into the base "
                f"weights, but adapter {name!r} is {config.peft_type}. Use LoRA, or `teacher_mode='copy'`."
            )
        if getattr(config, "use_dora", False):
            raise ValueError(
                "`teacher_sync_steps` with `teacher_mode='disable_adapter'` cannot fold a DoRA adapter and reset it. "
                "Set `use_dora=False` or `teacher_mode='copy'`."
            )
    for module in peft_model.get_base_model().modules():
        if not isinstance(module, LoraLayer):
            continue
        if len(getattr(module, "lora_embedding_A", {})) > 0:
            raise ValueError(
                "`teacher_sync_steps` with `teacher_mode='disable_adapter'` supports LoRA on linear layers only; "
                "remove embedding layers from `target_modules` or use `teacher_mode='copy'`."
            )
        if module.get_base_layer().weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                "`teacher_sync_steps` with `teacher_mode='disable_adapter'` cannot merge LoRA into a quantized base "
                "model; use `teacher_sync_steps=0`."
            )


class TeacherSyncCallback(TrainerCallback):
    """Calls `sync` after every `every` optimizer steps (`teacher_sync_steps`)."""

    def __init__(self, sync: Callable[[], None], every: int):
        self.sync = sync
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if self.every > 0 and state.global_step > 0 and state.global_step % self.every == 0:
            self.sync()


# --------------------------------------------------------------------------------------------------------------------
# Saving and restoring the teacher: a sync changes weights that the standard checkpoint does not hold
# --------------------------------------------------------------------------------------------------------------------
TEACHER_STATE_FILE = "sdzero_teacher.pt"


def _teacher_parameters(module, teacher_mode: str) -> dict[str, torch.nn.Parameter]:
    """The parameters a sync writes: the whole separate teacher, or (adapter-disabled teacher) the base weights
    `merge_and_reset_lora` folds into, which a PEFT checkpoint (adapter only) leaves out."""
    params = dict(module.named_parameters())
    if teacher_mode != "disable_adapter":
        return params
    return {name: p for name, p in params.items() if ".base_layer." in name or ".original_module." in name}


def save_teacher_state(module, directory: str, teacher_mode: str, write: bool = True) -> str:
    """Write the teacher's synced weights to `directory/sdzero_teacher.pt`; returns the file.

    Every process must call this (FSDP2 shards are gathered); only those with `write` write the file. With the
    adapter-disabled teacher these are also the base weights the saved adapter applies to once a sync has happened:
    the student is this base + the adapter, no longer theta_SRT + the adapter.
    """
    path = os.path.join(directory, TEACHER_STATE_FILE)
    state = {name: _full(p.detach()).cpu().clone() for name, p in _teacher_parameters(module, teacher_mode).items()}
    if write:
        os.makedirs(directory, exist_ok=True)
        torch.save(state, path)
    return path


@torch.no_grad()
def load_teacher_state(module, directory: str, teacher_mode: str) -> bool:
    """Restore `save_teacher_state`'s weights into `module` (the teacher, or the PEFT student for the adapter-disabled
    teacher). Returns False when `directory` holds none (a run saved before any sync support)."""
    path = os.path.join(directory, TEACHER_STATE_FILE)
    if not os.path.isfile(path):
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = _teacher_parameters(module, teacher_mode)
    if set(state) != set(params):
        raise ValueError(f"{path} does not match the teacher's parameters (e.g. "
                         f"{sorted(set(state) ^ set(params))[:3]}); it was saved by another model or teacher_mode.")
    for name, tensor in state.items():
        _assign(params[name], tensor)
    return True
