"""One service as a real process plus the real Kafka broker (marked `integration`)."""
