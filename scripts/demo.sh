#!/usr/bin/env bash
# `make demo`: a short research session on embedded defaults, on this machine, in ./demo-workspace.
# init -> prepare (stdlib corpus) -> once (offline agent, short CPU budget) -> results table + report.
# Uses Docker when an engine answers and the offline trainer image can be built; else the local
# backend (with a loud warning). Idempotent: a second run reuses the workspace, data and image.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
AR="$VENV/bin/autoresearch"
WS=${DEMO_WORKSPACE:-demo-workspace}
EXPERIMENTS=${DEMO_EXPERIMENTS:-3}
# 60 s of CPU training: long enough that one run's seed noise is a few percent of val_bpb at most (20 s was not:
# a demo reported +8% against its baseline with nothing changed); see docs/judge.md, "The demo".
BUDGET=${DEMO_BUDGET:-60}
say() { printf '[demo] %s\n' "$*"; }

case "$WS" in /*) ;; *) WS="$PWD/$WS" ;; esac  # DEMO_WORKSPACE may be absolute or relative to the project
export AUTORESEARCH_WORKSPACE="$WS"
export AUTORESEARCH_TRAINING__PRESET=${AUTORESEARCH_TRAINING__PRESET:-cpu}
export AUTORESEARCH_AGENT__PROVIDER=offline
export AUTORESEARCH_METRICS__PORT=0
# Four noise runs: sigma on 4 degrees of freedom before the first candidate (one noise run, df 1, needed a win
# of ~23 sigma for a first-run keep).
export AUTORESEARCH_JUDGE__NOISE_RUNS=${AUTORESEARCH_JUDGE__NOISE_RUNS:-4}
export AUTORESEARCH_TRAINING__EVAL_TOKENS=${AUTORESEARCH_TRAINING__EVAL_TOKENS:-65536}
# 64 rows: a demo of the code path, too few for the causality probe to be a trust check (trainer/probe_power.py)
export AUTORESEARCH_TRAINING__PROBE_FLOOR=${AUTORESEARCH_TRAINING__PROBE_FLOOR:-false}
export AUTORESEARCH_DATA__VOCAB_SIZE=${AUTORESEARCH_DATA__VOCAB_SIZE:-2048}
# No smoke runs: on a CPU lane the next proposal's smoke run (pipelined while the lane trains) shares the cores
# with the measured run and costs it steps; the offline agent's hyperparameter edits do not need one.
export AUTORESEARCH_TRAINING__SMOKE=${AUTORESEARCH_TRAINING__SMOKE:-false}

say "workspace $WS (program.md, baseline train.py, git repo)"
"$AR" init "$WS"

if "$VENV/bin/python" -c 'import sandbox, sys; sys.exit(0 if sandbox.docker_available() else 1)'; then
  say "Docker answers: building (or reusing) the offline trainer image"
  if "$AR" image build --offline; then
    export AUTORESEARCH_SANDBOX__BACKEND=docker
  else
    say "offline image build failed: using the local backend"
    export AUTORESEARCH_SANDBOX__BACKEND=local
  fi
else
  say "no Docker engine: using the local backend (weaker isolation)"
  export AUTORESEARCH_SANDBOX__BACKEND=local
fi

say "preparing data from the Python standard library (tokenizer + token files; skipped when done)"
"$AR" prepare --source stdlib

say "research session: baseline, $AUTORESEARCH_JUDGE__NOISE_RUNS noise runs, $EXPERIMENTS candidates, ${BUDGET}s training each"
"$AR" once --experiments "$EXPERIMENTS" --budget "$BUDGET"

say "morning report"
"$AR" report
say "done: results in $WS/results.tsv; kept changes on the git branch autoresearch/* in $WS"
