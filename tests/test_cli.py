"""The command line of ``python -m service``: one flag per setting, generated from the settings model.

Unit tests call :mod:`service.cli` directly (the environment through monkeypatch); the ``--help`` and
``--print-settings`` tests run the real command.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from processes import run_service_once
from pydantic import Field

from service.cli import (
    MASK,
    StartupError,
    build_parser,
    describe_settings,
    flag,
    read_configuration,
    unknown_variables,
)
from service.settings import OTHER_VARIABLES, Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No ``COGALORA_*`` variable of the machine running the tests leaks into these."""
    for key in [key for key in os.environ if key.upper().startswith("COGALORA_")]:
        monkeypatch.delenv(key)


def spelled(default: object) -> str:
    """A default as an environment variable spells it."""
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    return f"{default:g}" if isinstance(default, float) else str(default)


def test_help_lists_every_setting_with_its_flag_default_and_variable():
    result = run_service_once("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "usage: python -m service" in text
    for name, field in Settings.model_fields.items():
        assert f"{flag(name)} " in text, f"--help has no flag for {name}"
        assert f"[default: {spelled(field.default)}; env {Settings.variable(name)}]" in text, name
        first_words = " ".join((field.description or "").split()[:4])
        assert first_words in text, f"--help lacks the description of {name}"


def test_the_contract_flags_and_every_other_setting_parse_from_the_command_line(tmp_path):
    configuration = read_configuration(["--host", "127.0.0.1", "--port", "9100", "--model-dir", str(tmp_path)])
    settings = configuration.settings
    assert (settings.host, settings.port, settings.model_dir) == ("127.0.0.1", 9100, tmp_path)
    assert configuration.sources["port"] == "flag --port" and configuration.sources["max_queue"] == "default"
    assert not configuration.print_settings

    flags = "--max-batch-size 7 --max-wait-ms 2.5 --log-format json --require-all-adapters --api-key k"
    others = read_configuration([*flags.split(), "--metrics-adapter-labels", "top:3"]).settings
    assert (others.max_batch_size, others.max_wait_ms, others.log_format) == (7, 2.5, "json")
    assert others.require_all_adapters and others.metrics_adapter_labels == "top:3" and others.api_key_value() == "k"
    assert not read_configuration(["--no-require-all-adapters"]).settings.require_all_adapters


def test_flags_win_over_variables_which_win_over_defaults(monkeypatch):
    monkeypatch.setenv("COGALORA_PORT", "1")
    monkeypatch.setenv("COGALORA_MAX_QUEUE", "77")
    configuration = read_configuration(["--port", "9100"])
    assert (configuration.settings.port, configuration.settings.max_queue) == (9100, 77)
    assert configuration.sources["port"] == "flag --port"
    assert configuration.sources["max_queue"] == "env COGALORA_MAX_QUEUE"
    assert configuration.sources["host"] == "default"


def test_a_new_field_gets_its_flag_help_and_variable_with_nothing_written_by_hand(monkeypatch):
    class Extended(Settings):
        upload_limit_bytes: int = Field(5, ge=1, description="Largest adapter upload.")
        console: bool = Field(False, description="Serve the console.")
        allowed_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS.")

    help_text = " ".join(build_parser(Extended).format_help().split())
    assert "--upload-limit-bytes N Largest adapter upload. [default: 5; env COGALORA_UPLOAD_LIMIT_BYTES]" in help_text
    assert "--console, --no-console" in help_text and "--allowed-origins JSON" in help_text

    monkeypatch.setenv("COGALORA_UPLOAD_LIMIT_BYTES", "9")
    assert unknown_variables(os.environ, Extended) == []
    configuration = read_configuration(["--console", "--allowed-origins", '["https://a.example"]'], Extended)
    settings = configuration.settings
    assert (settings.upload_limit_bytes, settings.console, settings.allowed_origins) == (9, True, ["https://a.example"])
    printed = describe_settings(configuration)
    assert "COGALORA_UPLOAD_LIMIT_BYTES=9  # env COGALORA_UPLOAD_LIMIT_BYTES" in printed
    assert "COGALORA_CONSOLE=true  # flag --console" in printed
    with pytest.raises(StartupError, match="--allowed-origins: not valid JSON"):
        read_configuration(["--allowed-origins", "https://a.example"], Extended)


def test_unknown_variables_are_refused_with_the_closest_setting(monkeypatch):
    monkeypatch.setenv("COGALORA_APIKEY", "secret")
    monkeypatch.setenv("COGALORA_MAXQUEUE", "1")
    monkeypatch.setenv("COGALORA_TOTALLY_UNRELATED", "1")
    for variable in OTHER_VARIABLES:  # compose's own variables are not settings, and not typos either
        monkeypatch.setenv(variable, "x")
    problems = unknown_variables(os.environ)
    assert problems == [
        "unknown environment variable COGALORA_APIKEY (did you mean COGALORA_API_KEY?)",
        "unknown environment variable COGALORA_MAXQUEUE (did you mean COGALORA_MAX_QUEUE?)",
        "unknown environment variable COGALORA_TOTALLY_UNRELATED",
    ]
    with pytest.raises(StartupError, match=r"COGALORA_APIKEY \(did you mean COGALORA_API_KEY\?\)") as refused:
        read_configuration([])
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {"COGALORA_METRICS_ADAPTER_LABELS": "top:x"}, "METRICS_ADAPTER_LABELS: top:N needs a whole number N"),
        (["--port", "99999"], {}, "--port: Input should be less than or equal to 65535 (got '99999')"),
        ([], {"COGALORA_MAX_WAIT_MS": "fast"}, "COGALORA_MAX_WAIT_MS: Input should be a valid number"),
        (["--log-level", "verbose"], {}, "--log-level: unknown log level 'verbose'; choose from"),
    ],
)
def test_invalid_settings_name_the_setting_its_source_and_the_problem(monkeypatch, argv, env, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StartupError) as refused:
        read_configuration(argv)
    message = str(refused.value)
    assert expected in message and "\n" not in message
    assert "invalid literal" not in message and "Value error" not in message


def test_print_settings_shows_every_effective_value_and_its_source_with_secrets_masked(tmp_path):
    result = run_service_once(
        "--print-settings", "--port", "9100", COGALORA_PORT="1", COGALORA_API_KEY="s3cret", COGALORA_MAX_QUEUE="77"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(Settings.model_fields)
    assert "COGALORA_PORT=9100  # flag --port" in lines
    assert "COGALORA_MAX_QUEUE=77  # env COGALORA_MAX_QUEUE" in lines
    assert "COGALORA_HOST=0.0.0.0  # default" in lines
    assert f"COGALORA_API_KEY='{MASK}'  # env COGALORA_API_KEY" in lines
    assert "s3cret" not in result.stdout + result.stderr


def test_the_settings_table_of_the_docs_mirrors_the_model_in_both_directions():
    table = (REPO / "docs" / "service.md").read_text(encoding="utf-8")
    cells = [line.split("|") for line in table.splitlines() if line.startswith("| `COGALORA_")]
    rows = {row[1].strip(" `"): row[2].strip(" `") for row in cells}
    variables = {Settings.variable(name): field for name, field in Settings.model_fields.items()}
    assert sorted(rows) == sorted(variables), "docs/service.md: one row per setting, and no row for anything else"
    for variable, field in variables.items():
        if variable in ("COGALORA_MODEL_DIR", "COGALORA_API_KEY"):
            continue  # shown as <repo>/models and "unset"
        assert rows[variable] == spelled(field.default), variable
