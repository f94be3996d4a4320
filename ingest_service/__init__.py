"""The ingest service: validates view events and writes them durably to Kafka."""
