"""Shared code of the view-event services: configuration, Kafka and RocksDB helpers, generated stubs (viewevents.v1), the client and the CLI."""
