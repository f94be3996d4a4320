"""Unit tests of the `viewevents_tools` package."""
