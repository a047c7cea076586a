from imds_tracer import http


def test_parses_request_line_and_headers_case_insensitively():
    head = http.parse_request_head(
        b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n"
        b"x-AWS-ec2-metadata-token-ttl-seconds:  60 \r\n\r\nbody")
    assert (head.method, head.target, head.version) == ("PUT", "/latest/api/token", "HTTP/1.1")
    assert head.header("X-aws-ec2-metadata-token-ttl-seconds") == "60"
    assert head.header("absent") is None


def test_tolerates_bare_lf_junk_lines_and_folding():
    head = http.parse_request_head(b"GET /a?b=1 HTTP/1.0\nno colon here\nX-A: 1\n  more\n\n")
    assert head.target == "/a?b=1"
    assert head.headers == (("X-A", "1 more"),)


def test_rejects_non_requests_and_keeps_http09():
    assert http.parse_request_head(b"\x16\x03\x01\x02\x00") is None
    assert http.parse_request_head(b"FOO / HTTP/1.1\r\n\r\n") is None
    assert http.parse_request_head(b"GET /x\r\n").version == ""


def test_bounds_headers_and_fields():
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(500)) + b"\r\n"
    assert len(http.parse_request_head(many).headers) == http.MAX_HEADERS
    huge = b"GET / HTTP/1.1\r\nX: " + b"a" * 100000 + b"\r\n\r\n"
    value = http.parse_request_head(huge).header("x")
    assert len(value) <= http.MAX_FIELD


def test_head_end_and_request_start_detection():
    assert http.head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest") == 24
    assert http.head_end(b"GET / HTTP/1.1\nA: b\n\nrest") == 21
    assert http.head_end(b"GET / HTTP/1.1\r\nA: b\r\n") == -1
    assert http.could_start_request(b"GE")
    assert http.could_start_request(b"PUT /")
    assert not http.could_start_request(b"HELLO /")
    assert not http.could_start_request(b"\x00\x01")


def test_status_and_body_length():
    assert http.parse_status(b"HTTP/1.1 401 Unauthorized\r\n") == 401
    assert http.parse_status(b"HTTP/1.0 200\r\n") == 200
    assert http.parse_status(b"garbage") is None
    assert http.content_length(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n") == 12
    assert http.content_length(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n") is None
    assert http.is_chunked(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_header_lookup_is_the_first_value_after_folding():
    head = http.parse_request_head(b"GET / HTTP/1.1\r\nX-A: 1\r\n more\r\nx-a: 2\r\n\r\n")
    assert head.header("x-A") == "1 more" and head.has_header("X-A")
    assert not head.has_header("x-b")
    assert http.body_framing(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n") == (7, False)
    assert http.body_framing(b"PUT / HTTP/1.1\r\ntransfer-encoding: Chunked\r\n\r\n") == \
        (None, True)
