"""Unit tests of the `viewevents_client` package."""
