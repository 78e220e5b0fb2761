"""The CLI's exit codes and answers: one documented code per outcome, no traceback, whatever it is given."""

from __future__ import annotations

import contextlib
import json
import random
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import exits, main

VALID_STATUS: dict[str, Any] = {
    "daemon": {"instance": "lab", "owner": "lab:1-2-3-abc", "version": "0.1.0"},
    "window": None, "next_window": {"name": "night", "start": "2026-12-07T22:00:00+00:00",
                                    "end": "2026-12-08T07:00:00+00:00"},
    "lanes": [{"lane": "gpu0", "gpu_uuid": "GPU-1", "gpu_index": 0, "state": "idle", "experiment_id": None,
               "description": "", "reason": ""}],
    "session": None, "best": None, "baseline": None, "running": [],
    "tonight": {"since": "2026-12-06T22:00:00+00:00", "meaning": "since the last window"},
    "cost": {"usd": 0.0, "cap_usd": 25.0, "since": "2026-12-06T22:00:00+00:00"},
}


class FakeDaemon:
    """An HTTP server on 127.0.0.1 whose `/healthz` and `/status.json` answers the test sets."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {"/healthz": (200, b"ok\n"),
                                                      "/status.json": (200, json.dumps(VALID_STATUS).encode())}
        answers = self.answers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = answers.get(self.path, (404, b"not found"))
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fake_daemon() -> Iterator[FakeDaemon]:
    daemon = FakeDaemon()
    yield daemon
    daemon.close()


@pytest.fixture()
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`autoresearch ARGS` in this process, in an empty folder with no AUTORESEARCH_* variables."""
    import os

    for name in [n for n in os.environ if n.startswith("AUTORESEARCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTORESEARCH_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("AUTORESEARCH_METRICS__PORT", "0")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_help_shows_the_exit_code_table(cli: Callable[..., tuple[int, str, str]]) -> None:
    """`--help` lists every exit code with its meaning."""
    code, out, _ = cli("--help")
    assert code == 0
    for value, meaning in exits.TABLE:
        assert f"{value:>3}  {meaning}" in out


def test_status_url_without_a_scheme_means_http(cli: Callable[..., tuple[int, str, str]],
                                                fake_daemon: FakeDaemon) -> None:
    """`--url 127.0.0.1:PORT` asks http://127.0.0.1:PORT (it used to answer "not running")."""
    code, out, _ = cli("status", "--url", fake_daemon.url.removeprefix("http://"))
    assert code == exits.OK
    assert out.startswith(f"daemon: running at {fake_daemon.url}")


@pytest.mark.parametrize("url", ["notaurl:xx", "ftp://127.0.0.1:9464", "http://", "http://h:99999",
                                 "http://h:1/?q=1", "http://h\x1b[31m:1", " "])
def test_status_refuses_a_url_that_is_not_an_http_address(cli: Callable[..., tuple[int, str, str]], url: str) -> None:
    """A malformed `--url` is a usage error with an example, never a traceback."""
    code, _, err = cli("status", "--url", url)
    assert code == exits.USAGE
    assert err.startswith("error: --url") and "Traceback" not in err and "e.g. --url http://" in err


def test_a_stranger_answering_200_is_not_the_daemon(cli: Callable[..., tuple[int, str, str]],
                                                    fake_daemon: FakeDaemon) -> None:
    """A server that says 200 on /healthz but has no daemon status is "not running" (exit 3), named as such."""
    fake_daemon.answers["/status.json"] = (200, b"<html>hello</html>")
    code, out, _ = cli("status", "--url", fake_daemon.url)
    assert code == exits.NOT_RUNNING
    assert "not an autoresearch daemon" in out


@pytest.mark.parametrize("body", [{"daemon": "x"}, [1, 2], {"daemon": VALID_STATUS["daemon"], "lanes": "many"},
                                  {**VALID_STATUS, "cost": {"usd": "lots", "cap_usd": 1}},
                                  {**VALID_STATUS, "session": {"id": [1]}}])
def test_a_status_of_the_wrong_shape_is_refused_without_a_traceback(
        cli: Callable[..., tuple[int, str, str]], fake_daemon: FakeDaemon, body: object) -> None:
    """A /status.json of the wrong shape is not the daemon's: exit 3 and a reason, no traceback."""
    fake_daemon.answers["/status.json"] = (200, json.dumps(body).encode())
    code, out, err = cli("status", "--url", fake_daemon.url)
    assert code == exits.NOT_RUNNING and "Traceback" not in err + out


def test_an_unhealthy_daemon_exits_4(cli: Callable[..., tuple[int, str, str]], fake_daemon: FakeDaemon) -> None:
    """The daemon answers 503 on /healthz: exit 4, with its reason."""
    fake_daemon.answers["/healthz"] = (503, b"loop stalled for 900 s\n")
    code, out, _ = cli("status", "--url", fake_daemon.url)
    assert code == exits.UNHEALTHY and "loop stalled for 900 s" in out


def test_terminal_escapes_from_the_answer_are_not_printed(cli: Callable[..., tuple[int, str, str]],
                                                          fake_daemon: FakeDaemon) -> None:
    """Text from the answer reaches the terminal without control characters."""
    lanes = [{**VALID_STATUS["lanes"][0], "state": "busy\x1b]0;pwned\x07", "reason": "\x1b[2J"}]
    fake_daemon.answers["/status.json"] = (200, json.dumps({**VALID_STATUS, "lanes": lanes}).encode())
    code, out, _ = cli("status", "--url", fake_daemon.url)
    assert code == exits.OK and "\x1b" not in out and "\x07" not in out


def test_status_with_the_database_unreachable_exits_5(cli: Callable[..., tuple[int, str, str]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """No daemon answers and the database cannot be reached: exit 5, the driver's reason in full."""
    monkeypatch.setenv("AUTORESEARCH_DATABASE__URL", "postgresql://nobody@127.0.0.1:1/none")
    code, out, _ = cli("status")
    assert code == exits.DB_UNREACHABLE
    assert "database 127.0.0.1:1/none unreachable" in out and "Connection refused" in out


def test_a_database_error_is_not_cut_short(cli: Callable[..., tuple[int, str, str]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`experiments` on an unreachable database: exit 5 and the whole reason (it was cut at 120 characters)."""
    monkeypatch.setenv("AUTORESEARCH_DATABASE__URL", "postgresql://nobody@127.0.0.1:1/none")
    code, _, err = cli("experiments")
    assert code == exits.DB_UNREACHABLE
    line = err.splitlines()[0]
    assert "Connection refused" in line and len(line) > 120


@pytest.mark.parametrize("argv", [["init", "--json"], ["--json", "init"], ["db", "current", "--json"],
                                  ["doctor", "--json"]])
def test_json_is_refused_where_it_does_not_work(cli: Callable[..., tuple[int, str, str]], argv: list[str]) -> None:
    """`--json` on a command without JSON output is a usage error (exit 2)."""
    code, _, err = cli(*argv)
    assert code == exits.USAGE and "Traceback" not in err


def test_json_is_offered_only_by_the_commands_that_print_it(cli: Callable[..., tuple[int, str, str]]) -> None:
    """Every subcommand's help offers `--json` exactly when the command prints JSON."""
    from daemon.cli.app import HANDLERS, JSON_COMMANDS

    for command in HANDLERS:
        with contextlib.suppress(SystemExit):
            _, out, _ = cli(command, "--help")
        assert ("--json" in out) == (command in JSON_COMMANDS), command


def test_a_bad_environment_variable_is_blamed_as_such(cli: Callable[..., tuple[int, str, str]],
                                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A bad value from the environment names the variable, not the TOML file."""
    (tmp_path / "autoresearch.toml").write_text("[metrics]\nport = 9464\n")
    monkeypatch.setenv("AUTORESEARCH_METRICS__PORT", "99999")
    code, _, err = cli("experiments")
    assert code == exits.USAGE
    assert err.startswith("error: environment variable AUTORESEARCH_METRICS__PORT = '99999'")
    assert "autoresearch.toml" not in err


def test_init_creates_the_schema(cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    """After `init`, `db current` is at head (exit 0) and `experiments` works at once."""
    assert cli("init", str(tmp_path / "ws"))[0] == exits.OK
    assert cli("db", "current")[0] == exits.OK
    code, out, _ = cli("experiments")
    assert (code, out.strip()) == (exits.OK, "no experiments match")


def test_db_current_behind_head_exits_6(cli: Callable[..., tuple[int, str, str]]) -> None:
    """A schema behind this version's head is exit 6 with the command that fixes it."""
    assert cli("init")[0] == exits.OK
    assert cli("db", "downgrade", "--to", "0004", "--no-backup")[0] == exits.OK
    code, out, err = cli("db", "current")
    assert code == exits.SCHEMA_NOT_AT_HEAD
    assert out.startswith("schema 0004_") and "autoresearch db upgrade" in err


def test_no_session_yet_exits_7(cli: Callable[..., tuple[int, str, str]]) -> None:
    """`best` and `report` before any session: exit 7 (nothing yet), not a generic failure."""
    assert cli("init")[0] == exits.OK
    assert cli("best")[0] == exits.NOTHING_YET
    assert cli("report")[0] == exits.NOTHING_YET


# --- fuzz -------------------------------------------------------------------------------------------------

def _random_json(rng: random.Random, depth: int = 0) -> object:
    choice = rng.randrange(8 if depth < 4 else 5)
    if choice == 0:
        return rng.choice([None, True, False])
    if choice == 1:
        return rng.choice([0, -1, 2**70, 1.5, float("1e308")])
    if choice == 2:
        return rng.choice(["", "x" * 5000, "\x1b[2J", "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")])
    if choice in (3, 4):  # a valid status with one field broken
        broken = json.loads(json.dumps(VALID_STATUS))
        key = rng.choice(list(broken))
        broken[key] = _random_json(rng, depth + 1) if depth < 4 else None
        return broken
    if choice == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["daemon", "lanes", "session", "cost", "x"]): _random_json(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _random_body(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind >= 5:
        return json.dumps(VALID_STATUS).encode()
    if kind == 0:
        return b"[" * 100_000  # nesting deeper than the JSON parser's recursion
    if kind == 1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if kind == 2:
        return b""
    return json.dumps(_random_json(rng)).encode()


URL_PARTS = ["http://", "https://", "ftp://", "", "127.0.0.1", "[::1]", "localhost", ":", ":0", ":65536", ":abc",
             "/", "/status", "?x=1", "#f", "@", "user:pw@", " ", "\t", "%", "\x00", "é", "//"]


def test_fuzz_the_cli_never_prints_a_traceback(cli: Callable[..., tuple[int, str, str]],
                                               fake_daemon: FakeDaemon) -> None:
    """Random arguments, URLs and daemon answers: every run ends with a documented exit code, no traceback."""
    rng = random.Random(20261207)
    commands = [["status"], ["experiments"], ["best"], ["report"], ["db", "current"], ["notebook", "show"]]
    flags = ["--limit", "0", "-5", "abc", "--session", "999", "--status", "kept", "bogus", "--json", "--url",
             "--zz", "--config", "/nonexistent.toml", "--workspace", "", "--", "-n", "\x00x"]
    seen: set[int] = set()
    for round_ in range(300):
        fake_daemon.answers["/healthz"] = (rng.choice([200, 200, 200, 503, 500, 404]), rng.choice([b"ok", b"", b"\xff\xfe"]))
        fake_daemon.answers["/status.json"] = (rng.choice([200, 200, 200, 500, 404]), _random_body(rng))
        argv = list(rng.choice(commands))
        if argv[0] == "status" and rng.random() < 0.8:
            url = "".join(rng.choice(URL_PARTS) for _ in range(rng.randrange(4))) if rng.random() < 0.4 \
                else fake_daemon.url
            argv += ["--url", url]
        argv += [rng.choice(flags) for _ in range(rng.choice([0, 0, 1, 2]))]
        code, out, err = cli(*argv)
        seen.add(code)
        assert code in exits.CODES, (round_, argv, code, err)
        assert "Traceback" not in out + err and "internal error" not in err, (round_, argv, err)
    assert {exits.OK, exits.USAGE, exits.NOT_RUNNING, exits.UNHEALTHY} <= seen, seen  # the fuzz reached them all
