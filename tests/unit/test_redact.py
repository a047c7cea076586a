"""The redaction rule: what is shown identifies the caller and the request; every other value
is `<redacted>`, whatever its name. S3CRET stands for a credential in every way real clients
pass one; it must not survive any of them."""
import pytest

from imds_tracer.redact import REDACTED, escape, redact_argv, redact_header, redact_raw, \
    redact_url

SECRET = "S3CRET"
IMDS = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def test_header_values_are_shown_only_for_the_harmless_few():
    assert redact_header("X-aws-ec2-metadata-token", "AQAEAsecret==") == REDACTED
    assert redact_header("Authorization", "Bearer Oracle") == REDACTED
    # names nobody listed as secret are hidden too: the rule, not a list
    assert redact_header("X-Vault-Token", SECRET) == REDACTED
    assert redact_header("X-Made-Up", SECRET) == REDACTED
    assert redact_header("X-aws-ec2-metadata-token-ttl-seconds", "21600") == "21600"
    assert redact_header("User-Agent", "curl/7.88.1") == "curl/7.88.1"
    assert redact_header("Metadata-Flavor", "Google") == "Google"
    # an empty token is a finding worth seeing, and holds no secret
    assert redact_header("X-aws-ec2-metadata-token", "  ") == ""


@pytest.mark.parametrize("target, shown", [
    ("/latest/meta-data/x?token=S3CRET", "/latest/meta-data/x?token=<redacted>"),
    ("/x?a=1&X-Amz-Signature=S3CRET&b", "/x?a=<redacted>&X-Amz-Signature=<redacted>&<redacted>"),
    ("/x?S3CRET", "/x?<redacted>"),
    ("/x#S3CRET", "/x#<redacted>"),
    ("/metadata/instance?api-version=2021-02-01&format=text",
     "/metadata/instance?api-version=2021-02-01&format=text"),
    ("http://user:S3CRET@169.254.169.254/latest/?k=S3CRET",
     "http://<redacted>@169.254.169.254/latest/?k=<redacted>"),
    ("/latest/meta-data/", "/latest/meta-data/"),
])
def test_query_values_and_userinfo_are_hidden_names_kept(target, shown):
    assert redact_url(target) == shown


# argv as real clients take credentials, and what must still be seen of them
ARGVS = [
    (["curl", "-u", "user:S3CRET", IMDS], ["curl", "-u", "user: <redacted>", IMDS]),
    (["curl", "--user=admin:S3CRET", IMDS], ["curl", "--user=admin: <redacted>", IMDS]),
    (["curl", "-uadmin:S3CRET", IMDS], ["curl", "-u<redacted>", IMDS]),
    (["curl", "-s", "-H", "X-aws-ec2-metadata-token: S3CRET", IMDS],
     ["curl", "-s", "-H", "X-aws-ec2-metadata-token: <redacted>", IMDS]),
    (["curl", "-sSf", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 21600",
      "http://169.254.169.254/latest/api/token"],
     ["curl", "-sSf", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 21600",
      "http://169.254.169.254/latest/api/token"]),
    (["wget", "-q", "--header=X-aws-ec2-metadata-token: S3CRET", IMDS],
     ["wget", "-q", "--header=X-aws-ec2-metadata-token: <redacted>", IMDS]),
    (["wget", "--password=S3CRET", "--user", "bob", IMDS],
     ["wget", "--password=<redacted>", "--user", REDACTED, IMDS]),
    (["wget", "--header", "Authorization: Basic S3CRET", IMDS],
     ["wget", "--header", "Authorization: <redacted>", IMDS]),
    (["curl", IMDS + "?token=S3CRET"], ["curl", IMDS + "?token=<redacted>"]),
    (["curl", "http://me:S3CRET@169.254.169.254/"], ["curl", "http://<redacted>@169.254.169.254/"]),
    (["env", "TOKEN=S3CRET", "AWS_SECRET_ACCESS_KEY=S3CRET/x+y", "curl", IMDS],
     ["env", "TOKEN=<redacted>", "AWS_SECRET_ACCESS_KEY=<redacted>", "curl", IMDS]),
    (["curl", "-d", "password=S3CRET", IMDS], ["curl", "-d", "password=<redacted>", IMDS]),
    (["curl", "--data", '{"token":"S3CRET"}', IMDS], ["curl", "--data", REDACTED, IMDS]),
    (["mysql", "-pS3CRET"], ["mysql", "-p<redacted>"]),
    (["aws", "configure", "set", "aws_secret_access_key", "S3CRET"],
     ["aws", "configure", "set", "aws_secret_access_key", REDACTED]),
    (["http", "GET", IMDS, "X-aws-ec2-metadata-token:S3CRET"],
     ["http", "GET", IMDS, "X-aws-ec2-metadata-token: <redacted>"]),
    (["sh", "-c", "curl -s -H 'X-aws-ec2-metadata-token: S3CRET' " + IMDS],
     ["sh", "-c", "curl -s -H 'X-aws-ec2-metadata-token: <redacted>' " + IMDS]),
    (["python3", "-c", "import requests; requests.get('%s', auth=('u', 'S3CRET'))" % IMDS,
      "S3CRET"], None),
    (["/usr/bin/python3", "/opt/app/fetch.py", "--timeout", "5", "--retries=3"],
     ["/usr/bin/python3", "/opt/app/fetch.py", "--timeout", "5", "--retries=3"]),
]


@pytest.mark.parametrize("argv, shown", ARGVS, ids=[" ".join(a)[:40] for a, _ in ARGVS])
def test_argv_keeps_what_identifies_the_caller_and_hides_every_value(argv, shown):
    out = redact_argv(tuple(argv))
    assert SECRET not in " ".join(out)
    assert len(out) == len(argv)
    if shown is not None:
        assert list(out) == shown


@pytest.mark.parametrize("data", [
    b"GET /x?token=S3CRET HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://u:S3CRET@169.254.169.254/ HTTP/1.1\r\n",
    b"POST /token HTTP/1.1\r\nContent-Length: 6\r\n\r\nS3CRET",
    b"\x00junk\r\nX-aws-ec2-metadata-token: S3CRET\r\nauthorization:S3CRET\r\n",
    b"PUT /x HTTP/1.1\rX-Whatever:S3CRET\0Cookie: a=S3CRET\n",
    b"S3CRET",
    b"GET /x HTTP/1.1\r\nS3CRET\r\n",
])
def test_unparsed_bytes_follow_the_same_rule(data):
    text = redact_raw(data)
    assert SECRET not in text
    assert "\r" not in escape(text) and "\n" not in escape(text)


def test_unparsed_bytes_keep_the_request_line_and_header_names():
    text = redact_raw(b"GET /latest/meta-data/?a=S3CRET HTTP/1.1\r\nHost: 169.254.169.254\r\n"
                      b"X-aws-ec2-metadata-token: S3CRET\r\n\r\nbody")
    assert text == ("GET /latest/meta-data/?a=<redacted> HTTP/1.1\r\nHost: 169.254.169.254\r\n"
                    "X-aws-ec2-metadata-token: <redacted>\r\n\r\n<redacted>(4 bytes)")


def test_escape_makes_control_characters_and_backslashes_visible():
    assert escape("a\r\nb\x1b[31m\x00") == "a\\x0d\\x0ab\\x1b[31m\\x00"
    assert escape("back\\slash") == "back\\\\slash"
    assert escape("é") == "\\xe9"
    assert escape("a b)c", " )") == "a\\x20b\\x29c"
