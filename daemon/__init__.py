"""The autoresearch daemon: config, CLI, scheduler, research loop, agents, store, metrics, report."""

__version__ = "0.1.0"
