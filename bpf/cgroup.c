/* Cgroup backend: socket hooks attached to the root of the cgroup v2 hierarchy. Nothing runs
 * on the syscall path, so unrelated writes, reads and sends on the machine pay (almost)
 * nothing: no syscall tracepoint, no kprobe.
 *
 *   cgroup/connect4, cgroup/connect6   a TCP or UDP connect (also TCP Fast Open's implicit
 *       one) to a watched (address, port): the socket's cookie is remembered with the task
 *       that connected, and a CONNECT event carries that process's exec-time argv.
 *   cgroup_skb/egress, cgroup_skb/ingress   every packet of every socket; the first test is
 *       the socket's remote port, then its remote address against `watched`. Packets of
 *       watched sockets with payload, RSTs and FINs are copied (IP header onwards, up to
 *       IMDS_PAYLOAD_LIMIT bytes of payload out, IMDS_RESPONSE_BYTES in) as PACKET events:
 *       user space reassembles them by TCP sequence number with the replay's decoder, so
 *       retransmits and GSO are handled as in a capture. sendmmsg, sendfile, io_uring and
 *       inherited sockets all end up as packets here.
 *       The owner of a packet is the task its socket's cookie was remembered with at
 *       connect: cgroup_skb programs run in softirq too and may not ask for the current task
 *       on every kernel (see fill_unattributed).
 *   sched:sched_process_exec, sched:sched_process_fork   argv and parent, for processes that
 *       exit before user space reads /proc. argv is read from the new image's argument area:
 *       task_struct.mm and mm_struct.arg_start/arg_end offsets come from the running kernel's
 *       BTF (IMDS_TASK_MM_OFF, IMDS_MM_ARG_START_OFF, IMDS_MM_ARG_END_OFF); without them
 *       the exec program is not built and argv comes from /proc.
 *
 * Only packet bytes, hook context fields and helpers are read; the one kernel-struct read
 * (exec argv) uses offsets of the running kernel, never the headers'.
 */
#include "common.h"

#ifndef IMDS_PORT_MATCH
#define IMDS_PORT_MATCH(p) ((p) == 80)
#endif
/* Context fields must be loaded with their own offset: without this, clang merges the loads
 * of two branches into one through a computed pointer, which the verifier refuses. */
#define IMDS_CTX_LOADED(x) asm volatile("" : "+r"(x))

/* watch_key.addr from an IPv4 context field (as v4-mapped) or from the four 32-bit words of
 * an IPv6 one (user_ip6, remote_ip6: the verifier allows only 32-bit loads of those) */
#define IMDS_KEY_V4(key, field) do {                                                    \
        __u32 w_ = (field); IMDS_CTX_LOADED(w_);                                        \
        (key).addr[10] = 0xff; (key).addr[11] = 0xff;                                   \
        __builtin_memcpy(&(key).addr[12], &w_, 4);                                      \
    } while (0)
#define IMDS_KEY_V6(key, words) do {                                                    \
        __u32 w_;                                                                       \
        w_ = (words)[0]; IMDS_CTX_LOADED(w_); __builtin_memcpy(&(key).addr[0], &w_, 4);  \
        w_ = (words)[1]; IMDS_CTX_LOADED(w_); __builtin_memcpy(&(key).addr[4], &w_, 4);  \
        w_ = (words)[2]; IMDS_CTX_LOADED(w_); __builtin_memcpy(&(key).addr[8], &w_, 4);  \
        w_ = (words)[3]; IMDS_CTX_LOADED(w_); __builtin_memcpy(&(key).addr[12], &w_, 4); \
    } while (0)

/* socket cookie -> the task that connected it */
struct imds_sock {
    __u64 cgroup_id;
    __u32 tgid;
    __u32 tid;
    __u32 uid;
    __u32 ppid;
    __u16 flags;
    __u16 pad[3];
    char comm[16];
};
BPF_TABLE("lru_hash", __u64, struct imds_sock, socks, 16384);

/* Per-CPU scratch events, one per nesting level. A socket program running in process context
 * (connect, a send's egress) can be interrupted on its CPU by softirq network processing that
 * runs these programs again (a received packet's ingress, an ACK-clocked transmit's egress):
 * a single per-CPU buffer would be overwritten under the interrupted program's feet. A
 * per-CPU depth counter picks the slot; nested runs finish before the one they interrupted
 * resumes, so it behaves as a stack. */
#define IMDS_NEST 3
BPF_PERCPU_ARRAY(nest_depth, __u32, 1);
BPF_ARRAY(nest_scratch, struct imds_buf, IMDS_NCPU * IMDS_NEST);

static __always_inline struct imds_buf *scratch_enter(void)
{
    __u32 zero = 0;
    __u32 *depth = nest_depth.lookup(&zero);
    if (!depth || *depth >= IMDS_NEST)
        return 0;
    __u32 level = *depth;
    __u32 slot = bpf_get_smp_processor_id() * IMDS_NEST + level;
    struct imds_buf *b = nest_scratch.lookup(&slot);
    if (b)
        *depth = level + 1;
    return b;
}

static __always_inline void scratch_exit(void)
{
    __u32 zero = 0;
    __u32 *depth = nest_depth.lookup(&zero);
    if (depth && *depth)
        (*depth)--;
}

static __always_inline void remember_sock(__u64 cookie, struct imds_event *ev, __u16 flags)
{
    struct imds_sock s = {};
    s.cgroup_id = ev->cgroup_id;
    s.tgid = ev->tgid;
    s.tid = ev->tid;
    s.uid = ev->uid;
    s.ppid = ev->ppid;
    s.flags = flags;
    __builtin_memcpy(s.comm, ev->comm, sizeof(s.comm));
    socks.update(&cookie, &s);
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx, struct watch_key *key,
                                      __u16 family)
{
    if (!watched.lookup(key))
        return 1;
    struct imds_buf *b = scratch_enter();
    if (!b) {
        imds_count(IMDS_CNT_OUTPUT_FAILED);
        return 1;
    }
    imds_fill_task(&b->ev, IMDS_EV_CONNECT);
    __u64 cookie = bpf_get_socket_cookie(ctx);
    b->ev.conn_id = cookie;
    b->ev.family = family;
    b->ev.dport = key->port;
    b->ev.fd = 0;
    __builtin_memcpy(b->ev.daddr, key->addr, sizeof(b->ev.daddr));
    remember_sock(cookie, &b->ev, 0);
    imds_put_argv(b);
    imds_emit(ctx, b);
    scratch_exit();
    return 1;   /* never refuse a connect */
}

int imds_connect4(struct bpf_sock_addr *ctx)
{
    struct watch_key key = {};
    IMDS_KEY_V4(key, ctx->user_ip4);
    key.port = bpf_ntohs((__u16)ctx->user_port);
    if (!IMDS_PORT_MATCH(key.port))
        return 1;
    return on_connect(ctx, &key, IMDS_AF_INET);
}

int imds_connect6(struct bpf_sock_addr *ctx)
{
    struct watch_key key = {};
    key.port = bpf_ntohs((__u16)ctx->user_port);
    if (!IMDS_PORT_MATCH(key.port))
        return 1;
    IMDS_KEY_V6(key, ctx->user_ip6);
    return on_connect(ctx, &key, IMDS_AF_INET6);
}

/* A packet of a socket the connect hooks did not see: connected before the hooks were
 * attached. As far as the kernel can tell, it belongs to the task sending on it -- where the
 * kernel lets cgroup_skb programs ask (IMDS_SKB_CURRENT_TASK: 6.18 does, Debian's 5.10 and
 * 6.1 do not; user space probes it). A received packet is handled in softirq context, where
 * the current task is unrelated: no owner then. */
static __always_inline void fill_unattributed(struct __sk_buff *skb, struct imds_buf *b,
                                              int ingress, __u64 cookie)
{
#ifdef IMDS_SKB_CURRENT_TASK
    if (!ingress) {
        imds_fill_task(&b->ev, IMDS_EV_PACKET);
        b->ev.cgroup_id = bpf_skb_cgroup_id(skb);
        b->ev.flags = IMDS_F_OWNER_GUESSED;
        if (b->ev.tgid)
            remember_sock(cookie, &b->ev, IMDS_F_OWNER_GUESSED);
        return;
    }
#endif
    __builtin_memset(&b->ev, 0, sizeof(b->ev));
    b->ev.ts_ns = bpf_ktime_get_ns();
    b->ev.cgroup_id = bpf_skb_cgroup_id(skb);
    b->ev.kind = IMDS_EV_PACKET;
    b->ev.flags = IMDS_F_OWNER_GUESSED;
}

/* Fills the scratch event for a packet of a watched socket: owner, address, the bytes from
 * the IP header on. Returns 0, or -1 when the bytes could not be read. */
static __always_inline int fill_packet(struct __sk_buff *skb, struct imds_buf *b, int ingress,
                                       __u32 family, struct watch_key *key, __u32 headers)
{
    __u64 cookie = bpf_get_socket_cookie(skb);
    struct imds_sock *s = socks.lookup(&cookie);
    if (s) {
        b->ev.ts_ns = bpf_ktime_get_ns();
        b->ev.cgroup_id = s->cgroup_id;
        b->ev.tgid = s->tgid;
        b->ev.tid = s->tid;
        b->ev.uid = s->uid;
        b->ev.ppid = s->ppid;
        b->ev.kind = IMDS_EV_PACKET;
        b->ev.flags = s->flags;
        b->ev.payload_len = 0;
        b->ev.lost_bytes = 0;
        b->ev.fd_last = 0;
        __builtin_memcpy(b->ev.comm, s->comm, sizeof(b->ev.comm));
    } else {
        fill_unattributed(skb, b, ingress, cookie);
    }
    if (ingress)
        b->ev.flags |= IMDS_F_INGRESS;
    b->ev.conn_id = cookie;
    b->ev.fd = 0;
    b->ev.family = family;
    b->ev.dport = key->port;
    __builtin_memcpy(b->ev.daddr, key->addr, sizeof(b->ev.daddr));

    __u64 limit = headers + (ingress ? IMDS_RESPONSE_BYTES : IMDS_PAYLOAD_LIMIT);
    __u64 n = skb->len < limit ? skb->len : limit;
    if (n == 0)
        return -1;
    if (n > 2 * IMDS_PAYLOAD_CAP - 1)
        n = 2 * IMDS_PAYLOAD_CAP - 1;
    asm volatile("" : "+r"(n));
    /* 1 .. 2 * CAP, in a form the 5.10 and 6.1 verifiers bound from below too: they do not
     * learn n != 0 from the test above, and bpf_skb_load_bytes refuses a size that may be 0 */
    n = ((n - 1) & (2 * IMDS_PAYLOAD_CAP - 1)) + 1;
    if (bpf_skb_load_bytes(skb, 0, b->payload, n) != 0)
        return -1;
    b->ev.payload_len = n;
    b->ev.lost_bytes = skb->len - n;
    if (!ingress && b->ev.lost_bytes)
        imds_count(IMDS_CNT_SENDS_TRUNCATED);
    return 0;
}


static __always_inline int on_packet(struct __sk_buff *skb, int ingress)
{
    /* the socket's remote end: the same test for both directions, since the socket is the
     * client's (a server's socket has the metadata port as its local, not remote, port) */
    __u32 port = bpf_ntohl(skb->remote_port);
    if (!IMDS_PORT_MATCH(port))
        return 1;
    struct watch_key key = {};
    __u32 family = skb->family;
    if (family == IMDS_AF_INET) {
        IMDS_KEY_V4(key, skb->remote_ip4);
    } else if (family == IMDS_AF_INET6) {
        IMDS_KEY_V6(key, skb->remote_ip6);
    } else {
        return 1;
    }
    key.port = port;
    if (!watched.lookup(&key))
        return 1;

    /* a watched socket: keep packets with payload, RSTs and FINs (the server's ends a
     * connection for user space; the client's says it stopped waiting, so a token PUT left
     * unanswered is logged before the token-less fallback that follows it); skip pure ACKs
     * and SYNs: every event costs user space time, and those carry nothing it needs */
    __u8 first = 0;
    if (bpf_skb_load_bytes(skb, 0, &first, 1) != 0)
        return 1;
    __u32 l3;
    __u8 proto = 0;
    if ((first >> 4) == 4) {
        l3 = (first & 0x0f) * 4;
        bpf_skb_load_bytes(skb, 9, &proto, 1);
    } else if ((first >> 4) == 6) {
        l3 = 40;
        bpf_skb_load_bytes(skb, 6, &proto, 1);
    } else {
        return 1;
    }
    if (proto != 6 || l3 < 20 || l3 > 60) {
        /* not UDP, so a TCP packet whose header is not where we look (IPv6 extension
         * headers): not decoded, but counted rather than missed in silence */
        if ((first >> 4) == 6 && proto != 17)
            imds_count(IMDS_CNT_OUTPUT_FAILED);
        return 1;
    }
    __u8 tcp[2] = {};
    if (bpf_skb_load_bytes(skb, l3 + 12, tcp, 2) != 0)
        return 1;
    __u32 headers = l3 + (tcp[0] >> 4) * 4;
    __u8 tcp_flags = tcp[1];
    if (skb->len <= headers && !(tcp_flags & 0x05))
        return 1;                                      /* FIN 0x01, RST 0x04 */

    struct imds_buf *b = scratch_enter();
    if (!b) {
        imds_count(IMDS_CNT_OUTPUT_FAILED);   /* nested too deep: lost, and counted */
        return 1;
    }
    if (fill_packet(skb, b, ingress, family, &key, headers) == 0)
        imds_emit(skb, b);
    else
        imds_count(IMDS_CNT_OUTPUT_FAILED);
    scratch_exit();
    return 1;   /* never drop a packet */
}

int imds_egress(struct __sk_buff *skb)
{
    return on_packet(skb, 0);
}

int imds_ingress(struct __sk_buff *skb)
{
    return on_packet(skb, 1);
}

#ifdef IMDS_TASK_MM_OFF
/* sched:sched_process_exec: the new image's argument area, NUL-separated already */
int imds_on_exec(void *ctx)
{
    __u32 zero = 0;
    struct imds_argv *v = argv_scratch.lookup(&zero);
    if (!v)
        return 0;
    char *task = (char *)bpf_get_current_task();
    char *mm = 0;
    __u64 start = 0, end = 0;
    if (bpf_probe_read_kernel(&mm, sizeof(mm), task + IMDS_TASK_MM_OFF) != 0 || !mm)
        return 0;
    bpf_probe_read_kernel(&start, sizeof(start), mm + IMDS_MM_ARG_START_OFF);
    bpf_probe_read_kernel(&end, sizeof(end), mm + IMDS_MM_ARG_END_OFF);
    if (end <= start)
        return 0;
    __u64 len = end - start;
    v->truncated = len > IMDS_ARGV_BUF;
    asm volatile("" : "+r"(len));
    if (len > IMDS_ARGV_BUF)
        len = IMDS_ARGV_BUF;
    if (bpf_probe_read_user(v->buf, len, (void *)start) != 0)
        return 0;
    v->len = len;
    v->argc = 0;
    if (v->truncated)
        imds_count(IMDS_CNT_ARGV_TRUNCATED);
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    argv_cache.update(&tgid, v);
    return 0;
}
#endif
