"""Self-Distillation Zero (arXiv 2604.12002): Phase 1 self-revision training (`run_srt`) and Phase 2 on-policy
self-distillation (`SDZeroTrainer`)."""

from trl_sdx.sdzero.control_phrases import CORRECT_PHRASE, INCORRECT_PHRASE, OLMO_INCORRECT_PHRASE
from trl_sdx.sdzero.sdzero_config import SDZeroConfig
from trl_sdx.sdzero.sdzero_trainer import SDZeroTrainer
from trl_sdx.sdzero.teacher_inputs import TeacherInputs, build_teacher_inputs, control_text, truncated_length

__all__ = [
    "CORRECT_PHRASE",
    "INCORRECT_PHRASE",
    "OLMO_INCORRECT_PHRASE",
    "SDZeroConfig",
    "SDZeroTrainer",
    "TeacherInputs",
    "build_teacher_inputs",
    "control_text",
    "truncated_length",
]
