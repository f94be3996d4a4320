"""Several services together over the real broker (marked `integration`)."""
