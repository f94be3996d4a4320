"""Unit tests of the `viewevents` package."""
