"""Options: --name=value, GATEWAY_<NAME> env vars, the upstream key's env vars, bad values."""

from __future__ import annotations

import pytest

import gateway


def test_defaults() -> None:
    config = gateway.parse_config([], {})
    assert config == gateway.Config()
    assert (config.port, config.queue_size, config.concurrency) == (8000, 256, 32)


def test_env_vars_and_command_line_precedence() -> None:
    env = {"GATEWAY_QUEUE_SIZE": "7", "GATEWAY_PORT": "9001", "GATEWAY_DEMO": "true"}
    config = gateway.parse_config(["--port=9002", "--max-body-size=1234"], env)
    assert config.queue_size == 7
    assert config.port == 9002  # the command line wins
    assert config.demo is True
    assert config.max_body_size == 1234


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"OPENAI_API_KEY": "sk-o"}, "sk-o"),
        ({"UPSTREAM_API_KEY": "sk-u", "OPENAI_API_KEY": "sk-o"}, "sk-u"),
        ({"GATEWAY_UPSTREAM_API_KEY": "sk-g", "UPSTREAM_API_KEY": "sk-u"}, "sk-g"),
        ({}, ""),
    ],
)
def test_upstream_key_sources(env: dict[str, str], key: str) -> None:
    assert gateway.parse_config([], env).upstream_api_key == key


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--timezone=Mars/Olympus"], "not an IANA time zone"),
        (["--concurrency=0"], "--concurrency"),
        (["--queue-size=-1"], "--queue-size"),
        (["serve"], "unexpected arguments"),
    ],
)
def test_bad_options_are_refused(argv: list[str], error: str) -> None:
    with pytest.raises(gateway.ConfigError, match=error):
        gateway.parse_config(argv, {})


def test_bad_option_exits_with_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert gateway.main(["--timezone=Nowhere/Atall"]) == 2
    assert "not an IANA time zone" in capsys.readouterr().err
