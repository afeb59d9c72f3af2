# The two set-up commands of the README. Both create .venv on first use (tools/bootstrap.sh).
VENV ?= .venv
OFFLINE = HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1

.PHONY: env demo test

env:
	@./tools/bootstrap.sh

# Short real EntropyAwareGKDTrainer run: teacher SmolLM2-135M-Instruct, student its half-depth copy; prints the
# held-out student-teacher KL before -> after and writes outputs/entropy_gkd_demo/ (metrics, plot, model card).
demo: env
	$(OFFLINE) $(VENV)/bin/trl-sdx entropy-gkd --config examples/configs/entropy_gkd_demo.yaml

# The whole test suite (CPU, offline).
test: env
	$(OFFLINE) $(VENV)/bin/python -m pytest tests -q
