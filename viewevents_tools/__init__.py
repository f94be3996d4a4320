"""Tools people run: the `viewevents` CLI, the data generator, the dev stack (`make run`), the demo,
the container health probe and the dead-letter reader. Services never import this package."""
