"""A server: loads a span of blocks, announces it in the DHT, and runs inference and forward requests on it."""
