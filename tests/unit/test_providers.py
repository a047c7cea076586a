"""Providers are one table (classify.PROVIDERS): config choices, default watched addresses,
metrics label sets and redaction derive from it. A provider missing anywhere fails here; so
do the IBM Cloud and OpenStack IPv6 rows."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from imds_tracer import classify, config, redact
from imds_tracer.classify import PROVIDERS, classify as classify_exchange, reads_of
from imds_tracer.http import parse_request_head
from imds_tracer.model import Exchange
from imds_tracer.sinks.metrics import MetricsSink

SHIPPED = Path(__file__).resolve().parents[2] / "packaging" / "config.toml"


def test_every_provider_everywhere():
    names = [p.name for p in PROVIDERS]
    assert len(names) == len(set(names)) and "unknown" in names
    for p in PROVIDERS:
        if p.cloud:
            assert p.name in config.CLOUDS
            assert p.name in SHIPPED.read_text().split("[classify]")[1], p.name
        for addr in p.addresses:
            assert addr in config.Config().addresses
            assert addr in SHIPPED.read_text(), addr
        for header in p.secret_headers + ((p.token.token_header,) if p.token else ()):
            assert redact.is_secret_header(header)
            assert redact.redact_header(header.upper(), "v" * 20) == redact.REDACTED
    sink = MetricsSink(backend="replay", cloud=None)
    exported = sink_text(sink)
    for p in PROVIDERS:
        assert f'provider="{p.name}"' in exported, p.name


def sink_text(sink) -> str:
    from prometheus_client import generate_latest
    return generate_latest(sink.registry).decode()


def exchange(raw: bytes, dst="169.254.169.254", status=200) -> Exchange:
    head = parse_request_head(raw)
    return Exchange(flow=1, ts=0.0, dst_ip=dst, dst_port=80, source="replay", process=None,
                    head=head, status=status)


IBM_PUT = (b"PUT /instance_identity/v1/token?version=2022-03-01 HTTP/1.1\r\n"
           b"Host: api.metadata.cloud.ibm.com\r\nMetadata-Flavor: ibm\r\n"
           b"Content-Type: application/json\r\nContent-Length: 21\r\n\r\n")
IBM_GET = (b"GET /metadata/v1/instance?version=2022-03-01 HTTP/1.1\r\n"
           b"Host: api.metadata.cloud.ibm.com\r\nAuthorization: Bearer eyJraWQi\r\n\r\n")


@pytest.mark.parametrize("raw,want", [
    (IBM_PUT, ("ibm", "hardened", (), "INFO")),
    (IBM_PUT.replace(b"/instance_identity/", b"/identity/"), ("ibm", "hardened", (), "INFO")),
    (IBM_GET, ("ibm", "hardened", (), "INFO")),
    (IBM_PUT.replace(b"Metadata-Flavor: ibm\r\n", b""),
     ("ibm", "hardened", ("missing_metadata_flavor",), "ERROR")),
    (IBM_GET.replace(b"Authorization: Bearer eyJraWQi\r\n", b"Metadata-Flavor: ibm\r\n"),
     ("ibm", "hardened", ("missing_bearer",), "ERROR")),
    # DigitalOcean's /metadata/v1 has neither the version date nor a bearer token
    (b"GET /metadata/v1/id HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
     ("digitalocean", "n/a", (), "INFO")),
    # a GCP request stays GCP
    (b"GET /computeMetadata/v1/instance/id HTTP/1.1\r\nMetadata-Flavor: Google\r\n\r\n",
     ("gcp", "n/a", (), "INFO")),
])
def test_ibm_cloud_is_not_gcp(raw, want):
    v = classify_exchange(exchange(raw))
    assert (v.provider, v.mode, v.problems, v.level) == want


def test_ibm_token_put_and_iam_token_reads():
    assert reads_of("ibm", "PUT", "/instance_identity/v1/token") == "token"
    assert reads_of("ibm", "POST", "/instance_identity/v1/iam_token") == "credentials"


def test_openstack_ipv6_metadata_address():
    assert "fd00:a9fe:a9fe::254" in config.Config().addresses
    raw = b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: x\r\n\r\n"
    assert classify_exchange(exchange(raw, dst="fd00:a9fe:a9fe::254")).provider == "openstack"
    ec2 = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n"
    assert classify_exchange(exchange(ec2, dst="fd00:a9fe:a9fe::254")).provider == "openstack"
    assert classify_exchange(exchange(ec2, dst="fd00:a9fe:a9fe::254"), "huawei").provider \
        == "huawei"
    # and the kernel side watches it: the addresses the BPF map is filled from
    assert re.search(r'"fd00:a9fe:a9fe::254"', SHIPPED.read_text())
