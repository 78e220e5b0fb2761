"""The long-running daemon process:

- `serve`      `autoresearch run`: the foreground daemon; the scheduler opens windows, each one a session;
- `runtime`    the long-lived parts built from settings (store, sandbox, runner, agent, metrics);
- `reconcile`  start-up reconciliation after a crash or restart (database and sandbox agree again);
- `scheduler`  when the daemon may use which GPU: cron windows and idle-GPU harvesting;
- `lock`       one daemon per database and instance;
- `cluster`    the daemon's side of the Slurm backend: options and pre-run checks;
- `notify`     systemd `Type=notify` (READY, STOPPING, WATCHDOG, STATUS).
"""
