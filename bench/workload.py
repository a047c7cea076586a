"""Realistic metadata traffic for the benchmarks: the same request mix as raw chunks (for the
user-space pipeline) and as Ethernet frames in a pcap (for replay).

The mix, per "round" of requests (weights in MIX):
- aws-normal:    curl-style token-less GET, one send; the 200 response
- aws-hardened:  token PUT + GET with the token on one keep-alive connection (2 requests)
- aliyun-normal: token-less GET to 100.100.100.200
- azure:         GET /metadata/instance?api-version=... with Metadata: true
- gcp:           GET /computeMetadata/v1/... with Metadata-Flavor: Google
- split:         http.client-style request sent as three pieces (line, headers, blank line)

Tokens end in "==" like real AWS tokens (the AWS analyzer's redaction loop never ends on a
token without "==": the baseline must not hang).
"""
from __future__ import annotations

import os
import random
import struct

AWS, ALIYUN = "169.254.169.254", "100.100.100.200"
TOKEN = "AQAEAFs1Z2x0c2VjcmV0LXRva2VuLWZvci1iZW5jaG1hcmtzLW9ubHktMDEyMzQ1Njc4OQ=="


def _resp(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"Server: EC2ws\r\n\r\n" + body)


# (name, dst, [(direction, bytes), ...]) -- "q" request send, "r" response
CONVERSATIONS = {
    "aws-normal": (AWS, [
        ("q", b"GET /latest/meta-data/iam/security-credentials/role HTTP/1.1\r\n"
              b"Host: 169.254.169.254\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"),
        ("r", _resp(b'{"Code":"Success","AccessKeyId":"ASIAEXAMPLE","Expiration":"x"}')),
    ]),
    "aws-hardened": (AWS, [
        ("q", b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n"
              b"User-Agent: aws-sdk-go/1.44\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n"
              b"Content-Length: 0\r\n\r\n"),
        ("r", _resp(TOKEN.encode(), b"X-Aws-Ec2-Metadata-Token-Ttl-Seconds: 21600\r\n")),
        ("q", b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n"
              b"User-Agent: aws-sdk-go/1.44\r\nX-aws-ec2-metadata-token: " + TOKEN.encode()
              + b"\r\nAccept-Encoding: gzip\r\n\r\n"),
        ("r", _resp(b"i-0123456789abcdef0")),
    ]),
    "aliyun-normal": (ALIYUN, [
        ("q", b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 100.100.100.200\r\n"
              b"User-Agent: Wget/1.21.3\r\nAccept: */*\r\nConnection: Keep-Alive\r\n\r\n"),
        ("r", _resp(b"i-bp1abcdefghijklmnop")),
    ]),
    "azure": (AWS, [
        ("q", b"GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\n"
              b"Host: 169.254.169.254\r\nMetadata: true\r\nUser-Agent: azure-cli\r\n\r\n"),
        ("r", _resp(b'{"compute":{"location":"westeurope"}}')),
    ]),
    "gcp": (AWS, [
        ("q", b"GET /computeMetadata/v1/instance/id HTTP/1.1\r\nHost: metadata.google.internal"
              b"\r\nMetadata-Flavor: Google\r\nUser-Agent: python-requests/2.31\r\n\r\n"),
        ("r", _resp(b"1234567890123456789", b"Metadata-Flavor: Google\r\n")),
    ]),
    "split": (AWS, [
        ("q", b"GET /latest/meta-data/placement/availability-zone HTTP/1.1\r\n"),
        ("q", b"Host: 169.254.169.254\r\nAccept-Encoding: identity\r\n"
              b"User-Agent: Python-urllib/3.11\r\n"),
        ("q", b"\r\n"),
        ("r", _resp(b"eu-west-1a")),
    ]),
}
MIX = {"aws-normal": 3, "aws-hardened": 2, "aliyun-normal": 1, "azure": 2, "gcp": 1,
       "split": 1}


def schedule(n_conversations: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    names = [name for name, weight in MIX.items() for _ in range(weight)]
    return [rng.choice(names) for _ in range(n_conversations)]


def requests_in(name: str) -> int:
    """Complete request heads in a conversation (a split request counts once)."""
    stream = b"".join(data for d, data in CONVERSATIONS[name][1] if d == "q")
    return stream.count(b"\r\n\r\n")


# -- pcap --------------------------------------------------------------------------------
PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
_REC = struct.Struct("<IIII")
_ETH = bytes.fromhex("020000000001" "020000000002" "0800")
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01


def _ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    # checksum left 0: neither the replay reader nor tshark (by default) checks it
    return _IP.pack(0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0, src, dst) + payload


def tcp_frame(src, sport, dst, dport, seq, ack, flags, payload=b"") -> bytes:
    tcp = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535,
                    0, 0) + payload
    return _ETH + _ipv4(src, dst, 6, tcp)


def udp_frame(src, sport, dst, dport, payload) -> bytes:
    return _ETH + _ipv4(src, dst, 17, _UDP.pack(sport, dport, 8 + len(payload), 0) + payload)


def conversation_frames(name: str, client_port: int, rng: random.Random) -> list[bytes]:
    """A whole TCP connection: handshake, the conversation, FIN both ways."""
    dst_text, steps = CONVERSATIONS[name]
    cli, srv = bytes([10, 0, 0, 5]), bytes(int(x) for x in dst_text.split("."))
    cseq, sseq = rng.getrandbits(32), rng.getrandbits(32)
    out = [tcp_frame(cli, client_port, srv, 80, cseq, 0, SYN),
           tcp_frame(srv, 80, cli, client_port, sseq, cseq + 1, SYN | ACK),
           tcp_frame(cli, client_port, srv, 80, cseq + 1, sseq + 1, ACK)]
    cseq += 1
    sseq += 1
    for direction, data in steps:
        if direction == "q":
            out.append(tcp_frame(cli, client_port, srv, 80, cseq, sseq, PSH | ACK, data))
            cseq += len(data)
        else:
            out.append(tcp_frame(srv, 80, cli, client_port, sseq, cseq, PSH | ACK, data))
            sseq += len(data)
    out.append(tcp_frame(cli, client_port, srv, 80, cseq, sseq, FIN | ACK))
    out.append(tcp_frame(srv, 80, cli, client_port, sseq, cseq + 1, FIN | ACK))
    out.append(tcp_frame(cli, client_port, srv, 80, cseq + 1, sseq + 1, ACK))
    return out


class Background:
    """Unrelated traffic, every packet its own: HTTPS-looking TCP data, plain HTTP requests
    to other hosts (each a new connection, so tshark dissects every one as a request) and
    DNS-looking UDP."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.blob = os.urandom(1400)
        self.http = (b"GET /index.html HTTP/1.1\r\nHost: example.org\r\n"
                     b"User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n")
        self.me = bytes([10, 0, 0, 5])
        self.i = 0

    def frame(self) -> bytes:
        self.i += 1
        kind, rng = self.i % 10, self.rng
        bits = rng.getrandbits(48)
        host = bytes([93, 184, bits & 0xFF, 1 + (bits >> 8) % 254])
        sport = 1024 + (bits >> 16) % 60000
        seq = bits >> 16
        if kind < 5:
            size = (60, 300, 1400)[kind % 3]
            return tcp_frame(host, 443, self.me, sport, seq, 1, ACK | PSH, self.blob[:size])
        if kind < 8:
            return tcp_frame(self.me, sport, host, 80, seq, 1, ACK | PSH, self.http)
        return udp_frame(self.me, sport, bytes([10, 0, 0, 2]), 53, self.blob[:40])


def write_pcap(path: str, packets: int, metadata_share: float = 0.01, seed: int = 7) -> dict:
    """Write a pcap of about `packets` frames, `metadata_share` of them metadata traffic
    (whole conversations spread evenly). Returns what is in it."""
    rng = random.Random(seed)
    per_conv = sum(len(conversation_frames(n, 1, rng)) for n in MIX) / len(MIX)
    names = schedule(max(1, round(packets * metadata_share / per_conv)), seed)
    conv = [conversation_frames(n, 20000 + i % 40000, rng) for i, n in enumerate(names)]
    meta_packets = sum(len(c) for c in conv)
    total_bg = max(0, packets - meta_packets)
    every = max(1, total_bg // max(1, len(conv)))
    background = Background(rng)
    rec = _REC.pack
    t = [1_790_000_000, 0]  # sec, usec

    def record(frame: bytes) -> None:
        t[1] += 50
        if t[1] >= 1_000_000:
            t[0] += 1
            t[1] -= 1_000_000
        parts.append(rec(t[0], t[1], len(frame), len(frame)))
        parts.append(frame)

    written = 0
    with open(path, "wb") as fh:
        fh.write(PCAP_HEADER)
        parts: list[bytes] = []
        ci = 0
        for i in range(total_bg):
            record(background.frame())
            if i % every == 0 and ci < len(conv):
                for frame in conv[ci]:
                    record(frame)
                ci += 1
            if len(parts) > 50000:
                fh.write(b"".join(parts))
                parts.clear()
        for c in conv[ci:]:
            for frame in c:
                record(frame)
        fh.write(b"".join(parts))
    written = total_bg + meta_packets
    return {"packets": written, "metadata_packets": meta_packets,
            "metadata_share": round(meta_packets / written, 4),
            "conversations": len(names), "requests": sum(requests_in(n) for n in names)}


def write_one_request_pcap(path: str, name: str = "aliyun-normal") -> dict:
    """A capture of one whole connection carrying one request (what a user replays to check
    one finding): what `replay`'s start-up costs, more than its reading."""
    frames = conversation_frames(name, 40000, random.Random(1))
    with open(path, "wb") as fh:
        fh.write(PCAP_HEADER)
        for i, frame in enumerate(frames):
            fh.write(_REC.pack(1_790_000_000, i * 100, len(frame), len(frame)) + frame)
    return {"packets": len(frames), "requests": requests_in(name)}
