"""Provider, mode and problems of one request: the classification table of SPEC §2.

Pure functions of (request head, destination, response status, the VM's cloud). The token
protocols of AWS, Alibaba and Huawei differ only in names, so they are one table.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from .model import Classification, Exchange, RequestHead

TTL_MIN, TTL_MAX = 1, 21600


@dataclass(frozen=True)
class TokenProtocol:
    """A session-token ("hardened mode") protocol: PUT a TTL, then send the token."""
    token_path: str
    ttl_header: str
    token_header: str


@dataclass(frozen=True)
class Provider:
    """One row of the provider table: everything else (the classification below, the config's
    cloud choices and default watched addresses, the metrics' label sets, the redacted
    headers) derives from PROVIDERS, so a provider cannot be known in one place and missing
    in another (tests/unit/test_providers.py)."""
    name: str
    addresses: tuple[str, ...] = ()      # its metadata addresses, watched by default
    own_addresses: tuple[str, ...] = ()  # addresses that alone say it is this provider
    token: TokenProtocol | None = None
    secret_headers: tuple[str, ...] = ()  # lowercase names whose values are credentials
    dmi: tuple[str, ...] = ()            # DMI substrings (lowercase) naming this cloud
    cloud: bool = True                   # a cloud a VM can run on (config `cloud`)


_LINK_LOCAL = "169.254.169.254"
PROVIDERS = (
    Provider("aliyun", addresses=("100.100.100.200",), own_addresses=("100.100.100.200",),
             token=TokenProtocol("/latest/api/token", "x-aliyun-ecs-metadata-token-ttl-seconds",
                                 "x-aliyun-ecs-metadata-token"),
             secret_headers=("x-aliyun-ecs-metadata-token",), dmi=("alibaba cloud",)),
    Provider("aws", addresses=(_LINK_LOCAL, "fd00:ec2::254"), own_addresses=("fd00:ec2::254",),
             token=TokenProtocol("/latest/api/token", "x-aws-ec2-metadata-token-ttl-seconds",
                                 "x-aws-ec2-metadata-token"),
             secret_headers=("x-aws-ec2-metadata-token",), dmi=("amazon ec2", "amazon")),
    # Azure App Service's managed identity endpoint sends X-IDENTITY-HEADER
    Provider("azure", addresses=(_LINK_LOCAL,), secret_headers=("x-identity-header",),
             dmi=("microsoft corporation",)),
    Provider("gcp", addresses=(_LINK_LOCAL,), dmi=("google",)),
    # IBM Cloud VPC: PUT /identity/v1/token (or /instance_identity/v1/token before API version
    # 2025-08-26) with Metadata-Flavor: ibm, then Authorization: Bearer <token>; no
    # token-less mode (cloud.ibm.com/docs/vpc?topic=vpc-imd-identity-operations)
    Provider("ibm", addresses=(_LINK_LOCAL,), secret_headers=("authorization",),
             dmi=("ibm",)),
    Provider("oci", addresses=(_LINK_LOCAL,), dmi=("oraclecloud",)),
    # Huawei Cloud's OpenStack-style metadata service has the AWS-like token scheme.
    Provider("huawei", addresses=(_LINK_LOCAL,),
             token=TokenProtocol("/meta-data/latest/api/token", "x-metadata-token-ttl-seconds",
                                 "x-metadata-token"),
             secret_headers=("x-metadata-token",), dmi=("huawei",)),
    # OpenStack's IPv6 metadata address (Nova, neutron-metadata-agent since Victoria)
    Provider("openstack", addresses=(_LINK_LOCAL, "fd00:a9fe:a9fe::254"),
             own_addresses=("fd00:a9fe:a9fe::254",), dmi=("openstack",)),
    Provider("digitalocean", addresses=(_LINK_LOCAL,), dmi=("digitalocean",)),
    Provider("tencent", addresses=("169.254.0.23",), own_addresses=("169.254.0.23",),
             dmi=("tencent",)),
    Provider("unknown", cloud=False),
)
PROVIDER_NAMES = tuple(p.name for p in PROVIDERS)
CLOUD_NAMES = tuple(p.name for p in PROVIDERS if p.cloud)
WATCHED_ADDRESSES = tuple(dict.fromkeys(a for p in PROVIDERS for a in p.addresses))
SECRET_HEADER_NAMES = frozenset(h for p in PROVIDERS for h in p.secret_headers)
TOKEN_PROTOCOLS = {p.name: p.token for p in PROVIDERS if p.token is not None}

# Which provider an address belongs to when the address alone decides.
ADDRESS_PROVIDERS = {a: p.name for p in PROVIDERS for a in p.own_addresses}

_EC2_PATH = re.compile(r"^/(latest|\d{4}-\d{2}-\d{2}|1\.0)(/|$)")
_DO_PATH = re.compile(r"^/metadata/v1([/.]|$)")
_IBM_PATH = re.compile(r"^/(instance_)?identity/v1/")

# The clouds whose requests count as "this VM's own" for each detected cloud.
SAME_CLOUD = {"huawei": {"openstack", "huawei"}}

# DMI strings (sys_vendor, product_name, board_vendor, chassis_asset_tag) -> cloud, in table
# order (Huawei, whose VMs say OpenStack too, before OpenStack).
DMI_CLOUDS = tuple((needle, p.name) for p in PROVIDERS for needle in p.dmi)


def detect_cloud(dmi_dir: str = "/sys/class/dmi/id") -> str | None:
    """The cloud this VM runs on, from DMI; None when there is no DMI or nothing matches."""
    values = []
    for name in ("sys_vendor", "product_name", "board_vendor", "chassis_asset_tag",
                 "chassis_vendor", "bios_vendor"):
        try:
            values.append(Path(dmi_dir, name).read_text(errors="replace").strip().lower())
        except OSError:
            continue
    for value in values:
        for needle, cloud in DMI_CLOUDS:
            if needle in value:
                if cloud == "azure" and "virtual machine" not in " ".join(values):
                    continue  # Microsoft hardware that is not an Azure VM
                return cloud
    return None


def _query(target: str) -> str:
    return target.split("?", 1)[1] if "?" in target else ""


# Header-name prefixes that name a provider, strongest first.
HEADER_PROVIDERS = (("x-aliyun-ecs-metadata-", "aliyun"), ("x-aws-ec2-metadata-", "aws"),
                    ("x-metadata-token", "openstack"))
_HEADER_PREFIXES = tuple(prefix for prefix, _ in HEADER_PROVIDERS)


def _openstack(cloud: str | None) -> str:
    return "huawei" if cloud == "huawei" else "openstack"


def provider_of(head: RequestHead, dst_ip: str, cloud: str | None) -> str:
    """Who a request is meant for, from its address, headers and path (SPEC §2 table)."""
    by_address = ADDRESS_PROVIDERS.get(dst_ip)
    if by_address:
        return _openstack(cloud) if by_address == "openstack" else by_address
    names = head.first  # lowercase header names
    named = [n for n in names if n.startswith(_HEADER_PREFIXES)]
    if named:  # usually not: one pass over the names answered
        for prefix, provider in HEADER_PROVIDERS:
            if any(n.startswith(prefix) for n in named):
                return _openstack(cloud) if provider == "openstack" else provider
    path = head.path
    if path.startswith("/meta-data/latest/api/token"):
        return _openstack(cloud)
    flavor = (head.header("metadata-flavor") or "").strip().lower()
    if flavor == "ibm" or _IBM_PATH.match(path):
        return "ibm"
    if _DO_PATH.match(path):
        # IBM's /metadata/v1/ carries a ?version= date and its bearer token; DigitalOcean's not
        if "version=" in _query(head.target) and "authorization" in names:
            return "ibm"
        return "digitalocean"
    if path == "/metadata" or path.startswith("/metadata/"):
        return "azure"
    if path.startswith("/computeMetadata") or "metadata-flavor" in names:
        return "gcp"
    if path.startswith("/opc/"):
        return "oci"
    if path.startswith("/openstack"):
        return _openstack(cloud)
    if _EC2_PATH.match(path) or path == "/":
        if cloud in ("openstack", "huawei"):
            return cloud  # the EC2-compatible API of an OpenStack cloud
        return "aws"
    return "unknown"


def _token_mode(head: RequestHead, proto: TokenProtocol, status: int | None):
    problems = []
    token = head.header(proto.token_header)
    if head.method == "PUT" and head.path == proto.token_path:
        ttl = head.header(proto.ttl_header)
        if ttl is None:
            problems.append("ttl_missing")
        elif not (ttl.strip().isdigit() and TTL_MIN <= int(ttl.strip()) <= TTL_MAX):
            problems.append("ttl_out_of_range")
        if head.has_header("x-forwarded-for"):
            problems.append("x_forwarded_for")
        return "hardened", problems
    if token is not None:
        if not token.strip():
            problems.append("empty_token")
        elif status in (401, 403):
            problems.append("invalid_token")
        return "hardened", problems
    return "normal", problems


def _mode_and_problems(provider: str, head: RequestHead, status: int | None,
                       cloud: str | None):
    if provider in ("aws", "aliyun"):
        return _token_mode(head, TOKEN_PROTOCOLS[provider], status)
    if provider in ("huawei", "openstack"):
        proto = TOKEN_PROTOCOLS["huawei"]
        if provider == "huawei" or head.has_header(proto.token_header) or \
                head.has_header(proto.ttl_header):
            return _token_mode(head, proto, status)
        return "n/a", []  # plain OpenStack has no token mode
    problems = []
    if provider == "azure":
        if (head.header("metadata") or "").strip().lower() != "true":
            problems.append("missing_metadata_header")
        if "api-version=" not in _query(head.target):
            problems.append("missing_api_version")
        if head.has_header("x-forwarded-for"):
            problems.append("x_forwarded_for")
        return "n/a", problems
    if provider == "gcp":
        if (head.header("metadata-flavor") or "").strip() != "Google":
            problems.append("missing_metadata_flavor")
        return "n/a", problems
    if provider == "ibm":
        if head.method == "PUT" and _IBM_PATH.match(head.path):
            if (head.header("metadata-flavor") or "").strip().lower() != "ibm":
                problems.append("missing_metadata_flavor")
            return "hardened", problems
        if not (head.header("authorization") or "").strip().lower().startswith("bearer "):
            problems.append("missing_bearer")  # IBM answers nothing without the token
        return "hardened", problems
    if provider == "oci":
        if head.path.startswith("/opc/v1/") or head.path == "/opc/v1":
            return "normal", problems
        if head.path.startswith("/opc/v2"):
            if (head.header("authorization") or "").strip() != "Bearer Oracle":
                problems.append("missing_bearer")
            return "hardened", problems
        return "n/a", problems
    if provider == "unknown":
        return "unknown", problems
    return "n/a", problems


def classify(exchange: Exchange, cloud: str | None = None) -> Classification:
    """`cloud`: the VM's cloud when known (DMI or config), else None."""
    head = exchange.head
    if head is None:
        return Classification("unknown", "unknown", ("unparsed",), "ERROR")
    provider = provider_of(head, exchange.dst_ip, cloud)
    mode, problems = _mode_and_problems(provider, head, exchange.status, cloud)
    problems = tuple(sorted(set(problems))) if problems else ()
    level = "WARNING" if mode == "normal" else "ERROR" if problems else "INFO"
    note = None
    if cloud and provider != "unknown" and provider != cloud and \
            provider not in SAME_CLOUD.get(cloud, ()):
        # e.g. an SDK probing every cloud's endpoint at start-up: not this VM's IMDS
        level, note = "INFO", f"{provider}-style request on a {cloud} VM"
    return Classification(provider, mode, problems, level, note)


# What a request reads, by provider: (kind, path pattern). The first match wins; the order
# of READ_KINDS is what breaks first when the request is refused (a credential reader stops
# the application; a hostname lookup may not).
READ_KINDS = ("credentials", "user-data", "identity", "other", "token")
_EC2_READS = (
    ("credentials", r"/meta-data/(iam/security-credentials|identity-credentials)(/|$)"),
    ("credentials", r"/meta-data/ram/security-credentials(/|$)"),
    ("user-data", r"/user-data(/|$)"),
    ("identity", r"/dynamic/instance-identity(/|$)"),
)
_READS = {
    "aws": _EC2_READS, "aliyun": _EC2_READS, "openstack": _EC2_READS + (
        ("user-data", r"^/openstack/[^/]+/user_data$"),), "huawei": _EC2_READS,
    "azure": (("credentials", r"^/metadata/identity/oauth2/token"),
              ("user-data", r"^/metadata/instance/compute/(userData|customData)"),
              ("identity", r"^/metadata/attested/")),
    "gcp": (("credentials", r"^/computeMetadata/v1/instance/service-accounts/[^/]+/token"),
            ("identity", r"^/computeMetadata/v1/instance/service-accounts/[^/]+/identity"),
            ("user-data", r"^/computeMetadata/v1/instance/attributes/(user-data|startup-script)")),
    "oci": (("credentials", r"^/opc/v[12]/identity/"),
            ("user-data", r"^/opc/v[12]/instance/metadata/user_data")),
    "ibm": (("credentials", r"^/(instance_)?identity/v1/iam_token"),
            ("user-data", r"^/metadata/v1/instance/initialization")),
}
_READS_RE = {provider: tuple((kind, re.compile(pattern)) for kind, pattern in rows)
             for provider, rows in _READS.items()}


@functools.lru_cache(maxsize=4096)
def reads_of(provider: str, method: str | None, path: str | None) -> str | None:
    """credentials, user-data, identity, token (a token PUT) or other; None when unparsed."""
    if path is None:
        return None
    if method == "PUT" and path.endswith("/token"):
        return "token"  # the token PUT of every provider with one (AWS, Alibaba, Huawei, IBM)
    for kind, pattern in _READS_RE.get(provider, ()):
        if pattern.search(path):
            return kind
    return "other"
