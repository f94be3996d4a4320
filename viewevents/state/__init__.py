"""RocksDB state of the consuming services: the store (bounded memory), the transaction of one
consumed batch, the framework's key layout and the number codecs."""
