# Entry points. Every target does its own set-up (idempotent) on a fresh machine.
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: test demo lint typecheck setup services bench clean

setup:
	bash scripts/setup.sh venv

services:
	bash scripts/setup.sh services

lint: setup
	$(BIN)/ruff check daemon sandbox trainer tests bench

typecheck: setup
	$(BIN)/mypy

test: setup services
	$(BIN)/ruff check daemon sandbox trainer tests bench
	$(BIN)/mypy
	$(BIN)/pytest

demo: setup
	bash scripts/demo.sh

bench: setup services
	$(BIN)/python bench/trainer_cpu.py
	$(BIN)/python bench/sandbox_overhead.py
	$(BIN)/python bench/duty_cycle.py

clean:
	rm -rf .work demo-workspace
