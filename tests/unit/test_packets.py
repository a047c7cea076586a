"""The TCP decoder shared by replay and the cgroup backend, and the cgroup backend's pure
helpers (mount discovery, the port test it compiles in)."""
from __future__ import annotations

import struct

from imds_tracer.model import Direction
from imds_tracer.sources import cgroup
from imds_tracer.sources.packets import TCP_ACK, TCP_FIN, TCP_SYN, TcpDemux
from tests.kernel.conftest import Recorder

IMDS = "169.254.169.254"
CLIENT = "10.0.0.5"


def ipv4_tcp(src, dst, sport, dport, seq, flags, payload=b"", total=None):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
    length = total if total is not None else 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, 0, 0, 64, 6, 0,
                     bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    return ip + tcp + payload


def feed(demux, rec, packet, scope=None):
    return demux.ip_packet(packet, 0, 4, 1.0, rec, scope=scope)


REQUEST = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n"


def test_connection_from_syn_to_server_fin():
    demux, rec = TcpDemux([IMDS], [80], "cgroup"), Recorder()
    feed(demux, rec, ipv4_tcp(CLIENT, IMDS, 40000, 80, 100, TCP_SYN))
    feed(demux, rec, ipv4_tcp(IMDS, CLIENT, 80, 40000, 500, TCP_SYN | TCP_ACK))
    feed(demux, rec, ipv4_tcp(CLIENT, IMDS, 40000, 80, 101, TCP_ACK, REQUEST))
    feed(demux, rec, ipv4_tcp(IMDS, CLIENT, 80, 40000, 501, TCP_ACK | TCP_FIN, b"HTTP/1.1 200 OK\r\n"))
    data = [(c.direction, c.data, c.seq, c.source) for c in rec.chunks if c.data]
    assert data == [(Direction.REQUEST, REQUEST, 101, "cgroup"),
                    (Direction.RESPONSE, b"HTTP/1.1 200 OK\r\n", 501, "cgroup")]
    assert len(rec.closed) == 1 and len(demux) == 0


def test_unwatched_packets_are_not_matched():
    demux, rec = TcpDemux([IMDS], [80], "replay"), Recorder()
    assert not feed(demux, rec, ipv4_tcp(CLIENT, "10.0.0.9", 40000, 80, 1, TCP_ACK, REQUEST))
    assert rec.chunks == []


def test_scopes_keep_same_four_tuples_apart():
    # two network namespaces may use the same addresses and ports at the same time
    demux, rec = TcpDemux([IMDS], [80], "cgroup"), Recorder()
    for cookie in (1, 2):
        feed(demux, rec, ipv4_tcp(CLIENT, IMDS, 40000, 80, 7, TCP_ACK, REQUEST), scope=cookie)
    assert len({c.flow for c in rec.chunks}) == 2


def test_bytes_beyond_the_copy_are_reported_lost():
    demux, rec = TcpDemux([IMDS], [80], "cgroup"), Recorder()
    cut = ipv4_tcp(CLIENT, IMDS, 40000, 80, 7, TCP_ACK, REQUEST, total=40 + 3000)
    feed(demux, rec, cut)
    chunk, = rec.chunks
    assert (chunk.data, chunk.lost) == (REQUEST, 3000 - len(REQUEST))


def ipv6_tcp(src, dst, sport, dport, seq, flags, payload=b"", plen=None):
    import ipaddress
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0)
    length = plen if plen is not None else len(tcp) + len(payload)
    return (struct.pack("!IHBB", 6 << 28, length, 6, 64) + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed + tcp + payload)


def test_a_packet_bigger_than_64k_is_cut_not_shortened():
    # BIG TCP (Linux >= 6.3 IPv4, 5.19 IPv6): one GSO packet of up to 512 KiB whose IP length
    # field is 0. How much of it the copy limit / snap length left out is what the source
    # says it sent (skb->len, a pcap record's original length): those bytes are lost, not
    # a hole after the captured ones, nor (IPv6) the whole packet ignored
    for version, packet, addr in (
            (4, ipv4_tcp(CLIENT, IMDS, 40000, 80, 7, TCP_ACK, REQUEST, total=0), IMDS),
            (6, ipv6_tcp("fd00::5", "fd00:ec2::254", 40000, 80, 7, TCP_ACK, REQUEST, plen=0),
             "fd00:ec2::254")):
        demux, rec = TcpDemux([addr], [80], "cgroup"), Recorder()
        assert demux.ip_packet(packet, 0, version, 1.0, rec, wire_len=len(packet) + 150000)
        chunk, = rec.chunks
        assert (chunk.data, chunk.lost, chunk.seq) == (REQUEST, 150000, 7), version
        # not knowing the length sent: what was captured is the packet
        demux, rec = TcpDemux([addr], [80], "cgroup"), Recorder()
        demux.ip_packet(packet, 0, version, 1.0, rec)
        assert [(c.data, c.lost) for c in rec.chunks] == [(REQUEST, 0)], version


def test_connections_are_bounded_oldest_closed_first():
    demux, rec = TcpDemux([IMDS], [80], "replay", max_conns=2), Recorder()
    for port in (40001, 40002, 40003):
        feed(demux, rec, ipv4_tcp(CLIENT, IMDS, port, 80, 1, TCP_ACK, REQUEST))
    assert len(demux) == 2
    assert len(rec.closed) == 1 and rec.closed[0][2] == 40001


def test_cgroup2_root_only_counts_the_hierarchy_root(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw\n"
        f"41 31 0:38 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw\n")
    assert cgroup.cgroup2_mounts(mountinfo) == [str(tmp_path)]
    # a directory that is not inode 1, like a container's view of its own cgroup
    assert cgroup.cgroup2_root(mountinfo) is None
    mountinfo.write_text("")
    assert cgroup.cgroup2_mounts(mountinfo) == [] and cgroup.cgroup2_root(mountinfo) is None


def test_port_match_expression():
    assert cgroup.port_match([80]) == "((p) == 80)"
    assert cgroup.port_match([8080, 80, 80]) == "((p) == 80 || (p) == 8080)"
