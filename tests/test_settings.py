"""common/settings.py: each kind of value, and a bad one of each kind raises
ConfigError naming the variable."""

from __future__ import annotations

import pytest

from common.settings import ConfigError, choice, flag, integer, listed, number, size
from control.config import Settings
from runner.config import RunnerSettings
from runner.launchers.nomad_job import NomadSettings

NAME = "CONVEYOR_SOMETHING"


def test_unset_or_empty_gives_the_default() -> None:
    for env in ({}, {NAME: ""}, {NAME: "  "}):
        assert integer(env, NAME, 7) == 7
        assert number(env, NAME, 0.5) == 0.5
        assert choice(env, NAME, "a", ("a", "b")) == "a"
        assert flag(env, NAME, default=True) is True
        assert listed(env, NAME) == ()
        assert size(env, NAME, 1024) == 1024


def test_good_values_are_read() -> None:
    assert integer({NAME: " 12 "}, NAME, 0) == 12
    assert number({NAME: "1e3"}, NAME, 0.0) == 1000.0
    assert choice({NAME: "b"}, NAME, "a", ("a", "b")) == "b"
    assert [flag({NAME: v}, NAME) for v in ("1", "T", "true", "YES", "0", "f", "no")] == [
        True, True, True, True, False, False, False,
    ]  # fmt: skip
    assert listed({NAME: " x, ,y ,"}, NAME) == ("x", "y")
    assert size({NAME: "512MiB"}, NAME, 0) == 512 * 1024**2
    assert size({NAME: "2 GB"}, NAME, 0) == 2 * 1000**3


@pytest.mark.parametrize(
    ("read", "value", "reason"),
    [
        (lambda env: integer(env, NAME, 0), "six", "must be an integer, not 'six'"),
        (lambda env: integer(env, NAME, 0), "1.5", "must be an integer, not '1.5'"),
        (lambda env: number(env, NAME, 0.0), "soon", "must be a number, not 'soon'"),
        (lambda env: number(env, NAME, 0.0), "nan", "must be a number, not 'nan'"),
        (lambda env: choice(env, NAME, "a", ("a", "b")), "c", "must be a or b, not 'c'"),
        (
            lambda env: choice(env, NAME, "a", ("a", "b", "c")),
            "d",
            "must be one of a, b, c, not 'd'",
        ),
        (lambda env: flag(env, NAME), "maybe", "must be true or false, not 'maybe'"),
        (lambda env: size(env, NAME, 0), "lots", "must be a size such as"),
        (lambda env: size(env, NAME, 0), "5 parsecs", "must be a size such as"),
    ],
)
def test_a_bad_value_of_each_kind_names_the_variable(read: object, value: str, reason: str) -> None:
    assert callable(read)
    with pytest.raises(ConfigError) as caught:
        read({NAME: value})
    assert caught.value.name == NAME
    assert str(caught.value).startswith(f"{NAME}: {reason}")
    # Callers that catch ValueError (the runner's command line) still do.
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("build", "name", "value"),
    [
        (Settings.from_env, "CONVEYOR_DEFAULT_CONCURRENCY", "many"),
        (Settings.from_env, "CONVEYOR_STARTUP_DEADLINE_SECONDS", "soon"),
        (Settings.from_env, "CONVEYOR_RETENTION_DAYS", "-1"),
        (Settings.from_env, "CONVEYOR_FORGE_API_URLS", "ftp://x"),
        (NomadSettings.from_env, "CONVEYOR_NOMAD_DRIVER", "podman"),
        (NomadSettings.from_env, "CONVEYOR_NOMAD_KILL_TIMEOUT", "-3"),
        (NomadSettings.from_env, "NOMAD_SKIP_VERIFY", "perhaps"),
        (RunnerSettings.from_env, "CONVEYOR_RUNNER_CAPACITY", "six"),
        (RunnerSettings.from_env, "CONVEYOR_CACHE", "tape"),
        (RunnerSettings.from_env, "CONVEYOR_CACHE_MAX_TOTAL_MB", "0"),
        (RunnerSettings.from_env, "CONVEYOR_BUILD_NETWORK", "bridge"),
    ],
)
def test_every_settings_tree_raises_the_one_error(build: object, name: str, value: str) -> None:
    """The control plane's, the runner's and Nomad's settings all raise
    ConfigError naming the variable."""
    assert callable(build)
    env = {"CONVEYOR_CONTROL_ADDR": "127.0.0.1:7070", "CONVEYOR_RUNNER_TOKEN": "t", name: value}
    with pytest.raises(ConfigError) as caught:
        build(env)
    assert caught.value.name == name
