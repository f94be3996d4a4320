"""Offline evaluation of the recommender (`make eval`)."""
