"""The autoresearch daemon. Layout by concern:

- `research/`  the research loop: session driver, planner, judge (the keep rule), keeper, archive of
               near-misses, runner (train and eval stages in the sandbox), replay guard, stop rules,
               workspace (program.md, baseline, git), the agent's ledger and research lines;
- `agents/`    the LLM agents (Anthropic, OpenAI, offline, fallback), their prompt, tool schema, edits,
               ledger text and cost accounting;
- `store/`     the database: tables (`models`), records, SQL queries, migrations;
- `service/`   the long-running process: `serve` (`autoresearch run`), runtime, start-up reconcile,
               scheduler (windows, idle GPUs), the instance lock, Slurm options, systemd notify;
- `ops/`       what people and monitoring see: Prometheus metrics, the HTTP port, status data and page,
               the morning report, structured logs;
- `cli/`       the `autoresearch` command line (`daemon.cli:main`): commands, read-only readouts,
               doctor checks, notebook, terminal tables;
- top level:   `config` (pydantic settings; docker and sandbox flags live in its sections), `errors`,
               `clock`, `__main__` (`python -m daemon`).
"""

__version__ = "0.2.0"
