"""Replay output that survives holes and volume (issue 10, defects 1 and 2).

Holes: frames removed with `editcap` (Wireshark's own tool) from a real capture of 100
requests on one keep-alive connection (tests/data/keepalive100.pcap, made by
tests/data/make_pcaps.py): every request not removed is logged, the hole is counted.
Volume: a capture written by scapy with more requests than the trace log and the JSON file
hold before they rotate: replay keeps every record in the files the user named.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imds_tracer.sinks.files import LOCK_NAME

ROOT = Path(__file__).resolve().parents[2]
KEEPALIVE = ROOT / "tests" / "data" / "keepalive100.pcap"
PATH = re.compile(r"/latest/meta-data/ka-(\d{3})")


def replay(tmp: Path, pcap: Path, *extra: str) -> dict:
    log_dir, json_out = tmp / "logs", tmp / "out.jsonl"
    proc = subprocess.run([sys.executable, "-m", "imds_tracer", "replay", str(pcap),
                           "--log-dir", str(log_dir), "--json", str(json_out),
                           "--cloud", "none", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    return {"records": [json.loads(line) for line in json_out.read_text().splitlines()],
            "trace": (log_dir / "imds-trace.log").read_text(),
            "files": sorted(p.name for p in [*log_dir.iterdir(), *tmp.glob("out.jsonl*")]
                            if p.name != LOCK_NAME)}   # the agent's lock is no output


def request_frames() -> dict[int, int]:
    """Request number -> frame number in the capture, from tshark."""
    out = subprocess.run(["tshark", "-n", "-r", str(KEEPALIVE), "-Y", "http.request", "-T",
                          "fields", "-e", "frame.number", "-e", "http.request.uri"],
                         capture_output=True, text=True, check=True).stdout
    return {int(PATH.search(uri).group(1)): int(frame)
            for frame, uri in (line.split("\t") for line in out.splitlines())}


def without(tmp: Path, frames) -> Path:
    if shutil.which("editcap") is None:
        pytest.skip("editcap (tshark / wireshark-common) is not installed")
    out = tmp / "hole.pcap"
    subprocess.run(["editcap", str(KEEPALIVE), str(out), *map(str, frames)], check=True)
    return out


@pytest.mark.parametrize("removed", [[30], [5, 6, 7], [0], [99]])
def test_requests_after_a_hole_in_a_keep_alive_connection_are_all_logged(tmp_path, removed):
    frames = request_frames()
    assert sorted(frames) == list(range(100))
    out = replay(tmp_path, without(tmp_path, [frames[i] for i in removed]))
    seen = [int(PATH.search(r["path"]).group(1)) for r in out["records"]]
    assert seen == [i for i in range(100) if i not in removed]
    assert all(r["mode"] == "normal" for r in out["records"])
    assert out["trace"].count("[WARNING]") == 100 - len(removed)
    if removed != [99]:  # a last request missing is no hole: nothing follows it
        assert re.search(r"agent dropped .*stream_gap=", out["trace"])


def test_a_lost_response_does_not_lose_the_requests_after_it(tmp_path):
    status = subprocess.run(["tshark", "-n", "-r", str(KEEPALIVE), "-Y", "http.response",
                             "-T", "fields", "-e", "frame.number"],
                            capture_output=True, text=True, check=True).stdout.split()
    out = replay(tmp_path, without(tmp_path, [int(status[40])]))
    assert len(out["records"]) == 100


def _big_capture(path: Path, requests: int) -> None:
    """`requests` token-less GETs, 100 per keep-alive connection, each answered by a 404.
    scapy builds each connection's first packet in each direction and writes the file; the
    packets after it are those bytes with the sequence number, length and payload set."""
    from scapy.compat import raw
    from scapy.layers.inet import IP, TCP

    out = open(path, "wb")   # classic pcap, raw IP (linktype 101): the same on every scapy
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))

    def record(data: bytes, sec: int, usec: int) -> None:
        out.write(struct.pack("<IIII", sec, usec, len(data), len(data)) + data)

    ts = time.time() - 3600
    answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def put(template: bytes, seq: int, payload: bytes) -> None:
        head = bytearray(template[:40])
        struct.pack_into("!H", head, 2, 40 + len(payload))
        struct.pack_into("!I", head, 24, seq)
        record(bytes(head) + payload, sec=int(ts), usec=int(ts % 1 * 1e6))

    for conn in range(requests // 100):
        sport = 20000 + conn
        up = raw(IP(src="10.0.0.2", dst="169.254.169.254") /
                 TCP(sport=sport, dport=80, flags="PA"))
        down = raw(IP(src="169.254.169.254", dst="10.0.0.2") /
                   TCP(sport=80, dport=sport, flags="PA"))
        record(raw(IP(src="10.0.0.2", dst="169.254.169.254") /
                                TCP(sport=sport, dport=80, flags="S", seq=999)),
                            sec=int(ts), usec=0)
        record(raw(IP(src="169.254.169.254", dst="10.0.0.2") /
                                TCP(sport=80, dport=sport, flags="SA", seq=4999)),
                            sec=int(ts), usec=0)
        cseq, sseq = 1000, 5000
        for i in range(100):
            ts += 0.001
            req = (b"GET /latest/meta-data/big-%07d HTTP/1.1\r\nHost: 169.254.169.254\r\n"
                   b"User-Agent: volume\r\n\r\n" % (conn * 100 + i))
            put(up, cseq, req)
            put(down, sseq, answer)
            cseq += len(req)
            sseq += len(answer)
    out.close()


def test_replay_keeps_every_record_in_the_files_the_user_named(tmp_path):
    # more than the defaults rotate at: the trace log holds ~16,000 lines in 1 MiB, the JSON
    # file ~28,000 records in 16 MiB
    requests = 40000
    pcap = tmp_path / "big.pcap"
    _big_capture(pcap, requests)
    out = replay(tmp_path, pcap)
    assert out["files"] == ["imds-trace.log", "out.jsonl"]  # nothing rotated away
    assert len(out["records"]) == requests
    assert [r["path"] for r in out["records"][:2]] == ["/latest/meta-data/big-0000000",
                                                        "/latest/meta-data/big-0000001"]
    assert out["records"][-1]["path"] == f"/latest/meta-data/big-{requests - 1:07d}"
    assert out["trace"].count("[WARNING]") == requests
