"""The library every service imports: configuration, bootstrap, gRPC plumbing, Kafka, RocksDB state,
the exactly-once consumer loop, logs, metrics and the generated stubs (viewevents.v1).

It never names a service and holds no tools; the services, clients, tools, benchmarks and
evaluation build on it (imports only run downward)."""
