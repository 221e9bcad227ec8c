"""Operating a node: Prometheus metrics and the health check, read from the runtime at request time."""
