"""Every setting of every service in one table, for the tools that start or configure several
services (dev stack, demo, benchmarks, tests) and for the table in docs/operations.md
(`python -m viewevents_tools.settings_catalogue`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from ingest_service import settings as ingest
from recommender_service import settings as recommender
from stats_service import settings as stats
from viewevents import config
from viewevents.config import Config, Setting

ALL_SETTINGS: tuple[Setting, ...] = (
    config.SHARED_SETTINGS
    + config.CONSUMER_SETTINGS
    + ingest.OWN_SETTINGS
    + stats.OWN_SETTINGS
    + recommender.OWN_SETTINGS
)
_BY_NAME = {s.name: s for s in ALL_SETTINGS}


def load(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Every setting resolved: flag, else environment variable, else default."""
    return config.load(ALL_SETTINGS, args, env)


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    config.add_flags(parser, ALL_SETTINGS if names is None else [_BY_NAME[n] for n in names])


def to_environment(values: Config, base: Mapping[str, str] | None = None) -> dict[str, str]:
    return config.to_environment(values, base)


def markdown_table() -> str:
    return config.markdown_table(ALL_SETTINGS)


if __name__ == "__main__":
    print(markdown_table())
