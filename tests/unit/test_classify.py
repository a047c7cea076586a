import pytest

from imds_tracer.classify import classify, detect_cloud
from imds_tracer.http import parse_request_head
from imds_tracer.model import Exchange

AWS, ALI, AWS6 = "169.254.169.254", "100.100.100.200", "fd00:ec2::254"


def verdict(raw: bytes, dst=AWS, status=None, cloud=None):
    head = parse_request_head(raw)
    ex = Exchange(flow=1, ts=0.0, dst_ip=dst, dst_port=80, source="replay", process=None,
                  head=head, raw=raw if head is None else b"", status=status)
    c = classify(ex, cloud)
    return c.provider, c.mode, c.problems, c.level


def req(line: str, *headers: str) -> bytes:
    return ("\r\n".join([line + " HTTP/1.1", *headers]) + "\r\n\r\n").encode()


@pytest.mark.parametrize("raw,dst,status,expected", [
    # AWS IMDSv1 / IMDSv2
    (req("GET /latest/meta-data/instance-id"), AWS, 200, ("aws", "normal", (), "WARNING")),
    (req("GET /2021-07-15/meta-data/"), AWS, None, ("aws", "normal", (), "WARNING")),
    (req("GET /1.0/meta-data/"), AWS, None, ("aws", "normal", (), "WARNING")),
    (req("PUT /latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 21600"), AWS, 200,
     ("aws", "hardened", (), "INFO")),
    (req("GET /latest/meta-data/", "x-aws-ec2-metadata-token: T"), AWS6, 200,
     ("aws", "hardened", (), "INFO")),
    (req("GET /latest/meta-data/", "X-aws-ec2-metadata-token: T"), AWS, 401,
     ("aws", "hardened", ("invalid_token",), "ERROR")),
    (req("GET /latest/meta-data/", "X-aws-ec2-metadata-token:"), AWS, 401,
     ("aws", "hardened", ("empty_token",), "ERROR")),
    (req("PUT /latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 0"), AWS, 400,
     ("aws", "hardened", ("ttl_out_of_range",), "ERROR")),
    (req("PUT /latest/api/token", "X-aws-ec2-metadata-token-ttl-seconds: 1h"), AWS, 400,
     ("aws", "hardened", ("ttl_out_of_range",), "ERROR")),
    # Alibaba: the FAQ's failing requests
    (req("PUT /latest/api/token", "X-aliyun-ecs-metadata-token-ttl-seconds: 21700"), ALI, 400,
     ("aliyun", "hardened", ("ttl_out_of_range",), "ERROR")),
    (req("PUT /latest/api/token", "X-Forwarded-For: www.example.com"), ALI, 403,
     ("aliyun", "hardened", ("ttl_missing", "x_forwarded_for"), "ERROR")),
    (req("GET /latest/meta-data/", "X-aliyun-ecs-metadata-token: aaa"), ALI, 401,
     ("aliyun", "hardened", ("invalid_token",), "ERROR")),
    (req("GET /latest/meta-data/"), ALI, 200, ("aliyun", "normal", (), "WARNING")),
    # Azure, GCP: never normal mode
    (req("GET /metadata/instance?api-version=2021-02-01", "Metadata: true"), AWS, 200,
     ("azure", "n/a", (), "INFO")),
    (req("GET /metadata/instance"), AWS, 400,
     ("azure", "n/a", ("missing_api_version", "missing_metadata_header"), "ERROR")),
    (req("GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=x",
         "Metadata: true", "X-Forwarded-For: 1.2.3.4"), AWS, 400,
     ("azure", "n/a", ("x_forwarded_for",), "ERROR")),
    (req("GET /computeMetadata/v1/instance/id", "Metadata-Flavor: Google"), AWS, 200,
     ("gcp", "n/a", (), "INFO")),
    (req("GET /computeMetadata/v1/instance/id"), AWS, 403,
     ("gcp", "n/a", ("missing_metadata_flavor",), "ERROR")),
    # OCI, OpenStack, DigitalOcean, Tencent
    (req("GET /opc/v1/instance/"), AWS, 200, ("oci", "normal", (), "WARNING")),
    (req("GET /opc/v2/instance/", "Authorization: Bearer Oracle"), AWS, 200,
     ("oci", "hardened", (), "INFO")),
    (req("GET /opc/v2/instance/"), AWS, 401, ("oci", "hardened", ("missing_bearer",), "ERROR")),
    (req("GET /openstack/latest/meta_data.json"), AWS, 200, ("openstack", "n/a", (), "INFO")),
    (req("GET /metadata/v1/id"), AWS, 200, ("digitalocean", "n/a", (), "INFO")),
    (req("GET /latest/meta-data/"), "169.254.0.23", 200, ("tencent", "n/a", (), "INFO")),
    # not HTTP, or HTTP nobody documents
    (b"\x16\x03\x01\x00\xa5\x01", AWS, None, ("unknown", "unknown", ("unparsed",), "ERROR")),
    (req("GET /whatever"), AWS, 404, ("unknown", "unknown", (), "INFO")),
])
def test_classification_table(raw, dst, status, expected):
    assert verdict(raw, dst, status) == expected


def test_header_names_are_case_insensitive_for_provider_too():
    assert verdict(req("GET /foo", "X-AWS-EC2-METADATA-TOKEN: t"))[:2] == ("aws", "hardened")


def test_known_cloud_turns_other_clouds_probes_into_info():
    # a tracer probing the AWS endpoint on an Azure VM is not an IMDSv1 user
    assert verdict(req("GET /latest/meta-data/"), cloud="azure")[3] == "INFO"
    assert verdict(req("GET /latest/meta-data/"), cloud="aws")[3] == "WARNING"
    # on OpenStack the EC2-compatible path is OpenStack's own, which has no token mode
    assert verdict(req("GET /latest/meta-data/"), cloud="openstack")[:2] == ("openstack", "n/a")
    # Huawei Cloud has a token mode: token-less is normal mode there
    assert verdict(req("GET /openstack/latest/meta_data.json"), cloud="huawei")[:2] == \
        ("huawei", "normal")
    assert verdict(req("PUT /meta-data/latest/api/token", "X-Metadata-Token-Ttl-Seconds: 60"),
                   cloud="huawei")[:2] == ("huawei", "hardened")


def test_cloud_detection_from_dmi(tmp_path):
    assert detect_cloud(str(tmp_path / "missing")) is None
    (tmp_path / "sys_vendor").write_text("Alibaba Cloud\n")
    assert detect_cloud(str(tmp_path)) == "aliyun"
    (tmp_path / "sys_vendor").write_text("Amazon EC2\n")
    assert detect_cloud(str(tmp_path)) == "aws"
    (tmp_path / "sys_vendor").write_text("Microsoft Corporation\n")
    assert detect_cloud(str(tmp_path)) is None  # a Surface is not an Azure VM
    (tmp_path / "product_name").write_text("Virtual Machine\n")
    assert detect_cloud(str(tmp_path)) == "azure"
