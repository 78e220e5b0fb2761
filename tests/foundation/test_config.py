"""Configuration: TOML + environment + secret files, and the one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test starts with no AUTORESEARCH_* variables and no ./autoresearch.toml."""
    import os

    for key in list(os.environ):
        if key.startswith("AUTORESEARCH_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_run_with_nothing_installed(tmp_path: Path) -> None:
    """Without a file or env, the defaults are SQLite in the workspace, the offline agent, backend auto."""
    settings = load_settings()
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("workspace/autoresearch.db")
    assert settings.agent.resolved_provider() == "offline"
    assert settings.sandbox.backend == "auto"


def test_toml_file_values_are_read(tmp_path: Path) -> None:
    """Values in the TOML file override the defaults, nested tables included."""
    path = write(tmp_path / "c.toml", 'workspace = "/srv/ws"\n[training]\ntime_budget_s = 60\n')
    settings = load_settings(path)
    assert settings.workspace == Path("/srv/ws")
    assert settings.training.time_budget_s == 60


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTORESEARCH_SECTION__KEY beats the TOML file."""
    path = write(tmp_path / "c.toml", "[training]\ntime_budget_s = 60\n")
    monkeypatch.setenv("AUTORESEARCH_TRAINING__TIME_BUDGET_S", "42")
    assert load_settings(path).training.time_budget_s == 42


def test_default_file_in_cwd_is_picked_up(tmp_path: Path) -> None:
    """./autoresearch.toml is read when present and --config is not given."""
    write(tmp_path / "autoresearch.toml", "[judge]\nnoise_runs = 5\n")
    assert load_settings().judge.noise_runs == 5


def test_bad_type_names_key_and_value(tmp_path: Path) -> None:
    """A value of the wrong type is one line naming the key, the value and what is allowed."""
    path = write(tmp_path / "c.toml", '[agent]\ntemperature = "hot"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == (
        f"config {str(path)!r}: agent.temperature = 'hot': "
        "Input should be a valid number, unable to parse string as a number"
    )


def test_out_of_range_value_says_the_bound(tmp_path: Path) -> None:
    """A number outside its range says the allowed bound."""
    path = write(tmp_path / "c.toml", "[agent]\ntemperature = 7\n")
    with pytest.raises(ConfigError, match=r"agent.temperature = 7: Input should be less than or equal to 2"):
        load_settings(path)


def test_bad_choice_lists_allowed_values(tmp_path: Path) -> None:
    """A value outside a closed set lists the allowed ones."""
    path = write(tmp_path / "c.toml", '[sandbox]\nbackend = "vm"\n')
    with pytest.raises(ConfigError, match=r"sandbox.backend = 'vm': Input should be 'auto', 'docker', 'local' or 'slurm'"):
        load_settings(path)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    """A misspelt key is an error, not silently ignored."""
    path = write(tmp_path / "c.toml", "[training]\ntime_budget = 60\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "unknown key 'training.time_budget'" in str(info.value)


def test_unknown_env_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt environment override inside a section is an error too."""
    monkeypatch.setenv("AUTORESEARCH_TRAINING__TIME_BUDGET", "60")
    with pytest.raises(ConfigError, match=r"unknown key 'training\.time_budget'"):
        load_settings()


def test_missing_secret_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A *_FILE secret that cannot be read names the file and the reason."""
    missing = tmp_path / "nope"
    monkeypatch.setenv("AUTORESEARCH_AGENT__API_KEY_FILE", str(missing))
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"api_key_file {str(missing)!r} cannot be read: No such file or directory" in str(info.value)


def test_empty_secret_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty secret file is refused rather than sending an empty key."""
    empty = write(tmp_path / "key", "\n")
    monkeypatch.setenv("AUTORESEARCH_AGENT__API_KEY_FILE", str(empty))
    with pytest.raises(ConfigError, match="is empty"):
        load_settings()


def test_secret_file_sets_key_and_provider(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A readable secret file provides the key, which switches the auto provider to anthropic."""
    key = write(tmp_path / "key", "sk-test-123\n")
    monkeypatch.setenv("AUTORESEARCH_AGENT__API_KEY_FILE", str(key))
    settings = load_settings()
    assert settings.agent.api_key is not None
    assert settings.agent.api_key.get_secret_value() == "sk-test-123"
    assert settings.agent.resolved_provider() == "anthropic"
    assert "sk-test-123" not in repr(settings)


def test_bad_cron_is_explained(tmp_path: Path) -> None:
    """A window whose cron expression does not parse names the window and the field."""
    path = write(tmp_path / "c.toml", '[[scheduler.windows]]\ncron = "61 22 * * *"\nhours = 9\n')
    with pytest.raises(ConfigError, match=r"scheduler.windows.0.cron = '61 22 \* \* \*': not a crontab expression"):
        load_settings(path)


def test_bad_timezone_is_explained(tmp_path: Path) -> None:
    """An unknown time zone says to use an IANA name."""
    path = write(tmp_path / "c.toml", '[scheduler]\ntimezone = "Mars/Base"\n')
    with pytest.raises(ConfigError, match="unknown time zone"):
        load_settings(path)


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError naming the file, not a traceback."""
    path = write(tmp_path / "c.toml", "workspace = \n")
    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path)


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    """--config pointing nowhere fails; only the implicit default file may be absent."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.toml")


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    """Several bad values give one line each, so the user fixes them in one go."""
    path = write(tmp_path / "c.toml", '[agent]\ntemperature = "x"\n[judge]\nk = -1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert len(str(info.value).splitlines()) == 2
