"""Settings resolve as the docs promise: flag, else environment variable, else default, with the
declared type; a typo in a name fails loudly instead of being ignored."""

from __future__ import annotations

import argparse

import pytest

from viewevents.config import Config, Setting, add_flags, load, parse_bool, to_environment

SETTINGS = (
    Setting("workers", "T_WORKERS", 2, int, "an int"),
    Setting("ratio", "T_RATIO", 0.5, float, "a float"),
    Setting("verbose", "T_VERBOSE", False, parse_bool, "a bool"),
    Setting("name", "T_NAME", "default-name", str, "a string"),
)


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser, SETTINGS)
    return parser.parse_args(list(argv))


def test_defaults_when_neither_flag_nor_environment() -> None:
    config = load(SETTINGS, flags(), env={})
    assert config.as_dict() == {
        "workers": 2,
        "ratio": 0.5,
        "verbose": False,
        "name": "default-name",
    }


def test_environment_beats_default_and_is_converted() -> None:
    env = {"T_WORKERS": "7", "T_RATIO": "0.25", "T_VERBOSE": "yes", "T_NAME": "from-env"}
    config = load(SETTINGS, flags(), env=env)
    assert (config.workers, config.ratio, config.verbose, config.name) == (
        7,
        0.25,
        True,
        "from-env",
    )
    assert type(config.workers) is int and type(config.ratio) is float and config.verbose is True


def test_flag_beats_environment() -> None:
    env = {"T_WORKERS": "7", "T_RATIO": "0.25", "T_VERBOSE": "true", "T_NAME": "from-env"}
    config = load(
        SETTINGS,
        flags("--workers", "9", "--ratio", "1.5", "--verbose", "off", "--name", "from-flag"),
        env=env,
    )
    assert (config.workers, config.ratio, config.verbose, config.name) == (
        9,
        1.5,
        False,
        "from-flag",
    )


def test_only_the_given_flags_override() -> None:
    config = load(SETTINGS, flags("--ratio", "2"), env={"T_WORKERS": "3"})
    assert (config.workers, config.ratio, config.verbose) == (3, 2.0, False)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("true", True),
        (" Yes ", True),
        ("ON", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("", False),
        ("maybe", False),
    ],
)
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value


def test_bad_environment_value_is_an_error() -> None:
    with pytest.raises(ValueError):
        load(SETTINGS, None, env={"T_WORKERS": "many"})


def test_replace_changes_known_names_and_rejects_unknown_ones() -> None:
    config = load(SETTINGS, None, env={})
    changed = config.replace(workers=5)
    assert (changed.workers, config.workers) == (5, 2)  # a new Config; the old one unchanged
    with pytest.raises(KeyError, match="wrokers"):
        config.replace(wrokers=5)
    with pytest.raises(AttributeError):
        _ = config.wrokers


def test_a_setting_declared_twice_is_rejected() -> None:
    twice = (*SETTINGS, Setting("ratio", "T_RATIO_AGAIN", 1.0, float, "a duplicate"))
    with pytest.raises(ValueError, match="ratio"):
        load(twice, None, env={})


def test_to_environment_round_trips_through_load() -> None:
    config = Config(SETTINGS, {"workers": 4, "ratio": 0.75, "verbose": True, "name": "x y"})
    env = to_environment(config, base={})
    assert env == {"T_WORKERS": "4", "T_RATIO": "0.75", "T_VERBOSE": "true", "T_NAME": "x y"}
    assert load(SETTINGS, None, env=env).as_dict() == config.as_dict()
