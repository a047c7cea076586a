"""Test lab for imds-tracer: a fake instance metadata service and a network-namespace harness.

- `tests.lab.fake_imds`: a fake IMDS HTTP/1.1 server (AWS and Alibaba token semantics,
  Azure, GCP and OCI header rules), importable or runnable as
  ``python -m tests.lab.fake_imds --bind ADDR ... --mode optional``.
- `tests.lab.netns`: `Lab`, a context manager that makes a throw-away network namespace whose
  loopback holds 169.254.169.254, 100.100.100.200 and fd00:ec2::254, runs the fake server in it,
  runs real clients in it (optionally in a cgroup v2 directory) and captures with tcpdump.
- `tests.lab.fixtures`: pytest fixtures built on both (import them from a conftest).
- `tests.lab.agent`: `AgentProcess`, `imds-tracer run` as a subprocess (ready line, JSON
  lines, metrics scraped over HTTP, SIGTERM stop), shared by the kernel, fault, packaging
  tests and the kernel benchmark.
- `tests.lab.clients`: client programs run inside the lab.

Everything here talks only to loopback or to namespaces it created itself.
"""
import os

# How much slower than this machine the lab runs: qemu guests under TCG set it (about 30); the
# lab's waits (agent ready, records, the fake server's keep-alive) are multiplied by it.
SLOW = max(1.0, float(os.environ.get("IMDS_TRACER_SLOW", "1") or 1))
