"""Unit tests of the `stats_service` package."""
