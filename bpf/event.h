/* The one event contract between the BPF programs (tracepoint.c, kprobe.c) and user space
 * (imds_tracer/sources/kernel.py mirrors `struct imds_event` with ctypes; a unit test pins the
 * two layouts together).
 *
 * Every event is this fixed-width header followed by `payload_len` bytes of payload; only
 * header + payload_len bytes are submitted, never the whole scratch buffer.
 *   IMDS_EV_CONNECT      a watched connection was opened; payload: the process's argv as
 *                        captured at exec time, NUL-separated (may be empty)
 *   IMDS_EV_SEND         bytes the process sent (request side); lost_bytes: bytes of that send
 *                        not copied (beyond the payload limit or the iovec bound)
 *   IMDS_EV_RECV         first bytes of what the process received (response side)
 *   IMDS_EV_CLOSE        the fd (or the fds fd..fd_last for close_range) was closed
 *   IMDS_EV_TGID_RESET   the process exec'd or exited: all its tracked fds are gone
 *   IMDS_EV_PACKET       (cgroup backend) one TCP packet of a watched socket, IP header
 *                        onwards; conn_id is the socket cookie; lost_bytes: bytes of the
 *                        packet not copied
 * IPv4 addresses are carried as v4-mapped IPv6 (::ffff:a.b.c.d) in daddr.
 */
#ifndef IMDS_EVENT_H
#define IMDS_EVENT_H

#define IMDS_EV_CONNECT 1
#define IMDS_EV_SEND 2
#define IMDS_EV_RECV 3
#define IMDS_EV_CLOSE 4
#define IMDS_EV_TGID_RESET 5
#define IMDS_EV_PACKET 6

#define IMDS_F_ARGV_TRUNCATED 0x1  /* CONNECT: argv longer than the cache holds */
#define IMDS_F_NO_ARGV 0x2         /* CONNECT: no exec seen for this process since load */
#define IMDS_F_INGRESS 0x4         /* PACKET: received, not sent */
#define IMDS_F_OWNER_GUESSED 0x8   /* PACKET: socket connected before load; owner = sender */

/* counters[] slots: drops the kernel side counts, read by user space */
#define IMDS_CNT_OUTPUT_FAILED 0   /* ring/perf buffer full: event lost */
#define IMDS_CNT_SENDS_TRUNCATED 1 /* sends not copied completely */
#define IMDS_CNT_STALE_FD 2        /* tracked fd found stale after exec/exit: forgotten */
#define IMDS_CNT_ARGV_TRUNCATED 3  /* exec argv longer than the cache */
#define IMDS_CNT_SLOTS 4

struct imds_event {
    __u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 conn_id;      /* unique per live connection (tracepoint: per connect; kprobe: sock) */
    __u64 cgroup_id;    /* cgroup v2 id of the sender */
    __u32 tgid;
    __u32 tid;
    __u32 uid;
    __u32 ppid;         /* parent tgid at fork time, 0 when unknown */
    __u32 fd;
    __u32 fd_last;      /* CLOSE: last fd of a closed range (== fd for a single close) */
    __u32 payload_len;  /* bytes of payload that follow this header */
    __u32 lost_bytes;   /* bytes of this send/receive that were not copied */
    __u16 kind;         /* IMDS_EV_* */
    __u16 family;       /* AF_INET (2) or AF_INET6 (10), as the process connected */
    __u16 dport;        /* host byte order */
    __u16 flags;        /* IMDS_F_* */
    __u8 daddr[16];     /* remote address, IPv4 v4-mapped */
    char comm[16];
    /* payload follows */
};

#endif
