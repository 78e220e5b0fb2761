"""What people and monitoring see of the daemon:

- `metrics`    Prometheus metrics (one registry, prefix `autoresearch_`);
- `http`       the metrics port: `/metrics`, `/healthz`, `/status.json`, the status page;
- `statusdata` the daemon's status as JSON data (read-only, free of secrets);
- `statuspage` the HTML status page;
- `report`     the morning report of a session (Markdown);
- `morning`    end of a session: write the report, optionally post its summary to a webhook;
- `logs`       structured logging (readable on a terminal, JSON lines otherwise).
"""
