"""Unit tests of the `recommender_service` package."""
