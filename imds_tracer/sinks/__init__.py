"""Where finished request records go: trace log, JSON lines, Prometheus metrics, console."""
