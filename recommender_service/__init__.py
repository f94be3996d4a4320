"""Recommender service: similar media and user recommendations from item-item statistics that
are maintained incrementally at ingestion time (see docs/recommender-service.md)."""
