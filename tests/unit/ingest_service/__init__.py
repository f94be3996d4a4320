"""Unit tests of the `ingest_service` package."""
