from imds_tracer.redact import REDACTED, escape, redact_header, redact_raw


def test_token_and_authorization_values_are_redacted():
    assert redact_header("X-aws-ec2-metadata-token", "AQAEAsecret==") == REDACTED
    assert redact_header("x-ALIYUN-ecs-metadata-token", "abc") == REDACTED
    assert redact_header("Authorization", "Bearer Oracle") == REDACTED
    assert redact_header("X-aws-ec2-metadata-token-ttl-seconds", "21600") == "21600"
    # an empty token is a finding worth seeing, and holds no secret
    assert redact_header("X-aws-ec2-metadata-token", "  ") == ""


def test_escape_makes_control_characters_and_backslashes_visible():
    assert escape("a\r\nb\x1b[31m\x00") == "a\\x0d\\x0ab\\x1b[31m\\x00"
    assert escape("back\\slash") == "back\\\\slash"
    assert escape("é") == "\\xe9"
    assert escape("a b)c", " )") == "a\\x20b\\x29c"


def test_raw_bytes_lose_secrets_too():
    text = redact_raw(b"\x00junk\r\nX-aws-ec2-metadata-token: TOPSECRET\r\nauthorization:x\r\n")
    assert "TOPSECRET" not in text and "authorization:x" not in text.lower()
    assert "\r" not in text and "\n" not in text


def test_tokens_on_a_command_line_are_redacted():
    from imds_tracer.redact import redact_text
    assert redact_text("X-aws-ec2-metadata-token: AQAEsecret==") == \
        "X-aws-ec2-metadata-token: " + REDACTED
    assert "Oracle" not in redact_text("Authorization:Bearer Oracle")
    assert redact_text("X-aws-ec2-metadata-token-ttl-seconds: 21600").endswith("21600")
    assert redact_text("http://169.254.169.254/latest/") == "http://169.254.169.254/latest/"
