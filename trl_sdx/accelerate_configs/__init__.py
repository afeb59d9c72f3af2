"""Accelerate launch configs shipped with trl_sdx (`--accelerate_config NAME`)."""
