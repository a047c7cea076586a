/* Kprobe backend: the TCP send path, where the socket's destination is known without tracking
 * fds (connections opened before the agent started are seen on their next send, whatever the
 * network namespace).
 *
 * One hook per call chain: tcp_sendmsg (or tcp_sendmsg_locked where tcp_sendmsg cannot be
 * probed), never also sock_sendmsg/inet_sendmsg, which would report each send twice.
 *
 * Every kernel struct offset below is an IMDS_OFF_* constant computed in user space from the
 * running kernel's BTF (imds_tracer/sources/btf.py): the headers BCC compiles against may be
 * another kernel's, and a wrong probe-read offset passes the verifier and reads garbage
 * (SPEC §6: iov_iter's ubuf/__iov moved from +24 in 6.1 to +16 in 6.18). There is no default:
 * compiling without them fails.
 *
 * The payload is copied for ITER_UBUF (a single user buffer: send(), write() since 6.0 — the
 * predecessor's "MISSING PAYLOAD") and ITER_IOVEC (writev, sendmsg: up to IMDS_MAX_IOV
 * segments); other iterator types carry kernel pages (sendfile, splice) and are counted as
 * lost bytes. The iterator type is read as the running kernel stores it (btf.py
 * `iter_type_layout`): a byte of its own since 5.14, a word shared with the direction bit
 * before (5.10), with that kernel's enum iter_type values.
 */
#include <uapi/linux/ptrace.h>
#include "common.h"

#define IMDS_TCP_CLOSE 7

struct recv_args {
    __u64 sk;
    __u64 buf;     /* first user buffer of the receive */
    __u64 len;     /* its length */
};

/* sockets seen sending to a watched address: sk -> 1; forgotten at TCP_CLOSE */
BPF_TABLE("lru_hash", __u64, __u8, kp_socks, 65536);
BPF_HASH(recv_pending, __u64, struct recv_args, 4096);

static __always_inline int sock_dst(const void *sk, struct watch_key *k, __u16 *family)
{
    const char *skc = (const char *)sk + IMDS_OFF_SK_COMMON;
    __u16 fam = 0, port = 0;
    bpf_probe_read_kernel(&fam, sizeof(fam), skc + IMDS_OFF_SKC_FAMILY);
    bpf_probe_read_kernel(&port, sizeof(port), skc + IMDS_OFF_SKC_DPORT);
    if (fam == IMDS_AF_INET) {
        __u32 addr = 0;
        bpf_probe_read_kernel(&addr, sizeof(addr), skc + IMDS_OFF_SKC_DADDR);
        k->addr[10] = 0xff;
        k->addr[11] = 0xff;
        __builtin_memcpy(&k->addr[12], &addr, 4);
    } else if (fam == IMDS_AF_INET6) {
        bpf_probe_read_kernel(&k->addr, sizeof(k->addr), skc + IMDS_OFF_SKC_V6_DADDR);
    } else {
        return 0;
    }
    k->port = __builtin_bswap16(port);
    *family = fam;
    return 1;
}

static __always_inline void fill_sock(struct imds_event *ev, __u64 sk, struct watch_key *k,
                                      __u16 family)
{
    ev->conn_id = sk;
    ev->fd = 0;
    ev->family = family;
    ev->dport = k->port;
    __builtin_memcpy(ev->daddr, k->addr, 16);
}

/* The iov_iter's type, an enum iter_type value of this kernel (little-endian: a narrower
 * field lands in the low bytes). */
static __always_inline __u32 iter_type(const char *it)
{
    __u32 type = 0;
    bpf_probe_read_kernel(&type, IMDS_ITER_TYPE_SIZE, it + IMDS_OFF_ITER_TYPE);
    return type & IMDS_ITER_TYPE_MASK;
}

/* The user buffer `it` reads from first: (address, length), or 0 when not user memory. */
static __always_inline __u64 iter_first_user(const char *it, __u64 *len)
{
    __u32 type = iter_type(it);
    __u64 skip = 0, count = 0;
    bpf_probe_read_kernel(&skip, sizeof(skip), it + IMDS_OFF_ITER_IOV_OFFSET);
    bpf_probe_read_kernel(&count, sizeof(count), it + IMDS_OFF_ITER_COUNT);
#if IMDS_OFF_ITER_UBUF >= 0
    if (type == IMDS_ITER_UBUF) {
        __u64 ubuf = 0;
        bpf_probe_read_kernel(&ubuf, sizeof(ubuf), it + IMDS_OFF_ITER_UBUF);
        *len = count;
        return ubuf + skip;
    }
#endif
    if (type == IMDS_ITER_IOVEC) {
        __u64 iov = 0;
        struct { __u64 base; __u64 len; } v = {};
        bpf_probe_read_kernel(&iov, sizeof(iov), it + IMDS_OFF_ITER_IOV);
        bpf_probe_read_kernel(&v, sizeof(v), (const void *)iov);
        *len = v.len > skip ? v.len - skip : 0;
        return v.base + skip;
    }
    return 0;
}

int imds_tcp_sendmsg(struct pt_regs *ctx)
{
    const void *sk = (const void *)PT_REGS_PARM1(ctx);
    const char *msg = (const char *)PT_REGS_PARM2(ctx);
    struct watch_key k = {};
    __u16 family = 0;
    if (!sock_dst(sk, &k, &family) || !watched.lookup(&k))
        return 0;
    __u64 skp = (__u64)sk;
    struct imds_buf *b = imds_scratch();
    if (!b)
        return 0;
    if (!kp_socks.lookup(&skp)) {
        /* first send on this socket: who is talking (argv from the exec cache) */
        __u8 one = 1;
        kp_socks.update(&skp, &one);
        imds_fill_task(&b->ev, IMDS_EV_CONNECT);
        fill_sock(&b->ev, skp, &k, family);
        imds_put_argv(b);
        imds_emit(ctx, b);
    }
    imds_fill_task(&b->ev, IMDS_EV_SEND);
    fill_sock(&b->ev, skp, &k, family);

    const char *it = msg + IMDS_OFF_MSG_ITER;
    __u32 type = iter_type(it);
    __u64 skip = 0, count = 0;
    bpf_probe_read_kernel(&skip, sizeof(skip), it + IMDS_OFF_ITER_IOV_OFFSET);
    bpf_probe_read_kernel(&count, sizeof(count), it + IMDS_OFF_ITER_COUNT);
    __u32 off = 0;
#if IMDS_OFF_ITER_UBUF >= 0
    if (type == IMDS_ITER_UBUF) {
        __u64 ubuf = 0;
        bpf_probe_read_kernel(&ubuf, sizeof(ubuf), it + IMDS_OFF_ITER_UBUF);
        off = imds_copy_user(b, 0, (const void *)(ubuf + skip), count, IMDS_PAYLOAD_LIMIT);
    }
#endif
    if (type == IMDS_ITER_IOVEC) {
        __u64 iov = 0, nr = 0;
        bpf_probe_read_kernel(&iov, sizeof(iov), it + IMDS_OFF_ITER_IOV);
        bpf_probe_read_kernel(&nr, sizeof(nr), it + IMDS_OFF_ITER_NR_SEGS);
        off = imds_copy_iovecs(b, iov, nr, skip, count, IMDS_PAYLOAD_LIMIT, 1);
    }
    b->ev.payload_len = off;
    b->ev.lost_bytes = count > off ? (__u32)(count - off) : 0;
    if (b->ev.lost_bytes)
        imds_count(IMDS_CNT_SENDS_TRUNCATED);
    imds_emit(ctx, b);
    return 0;
}

int imds_tcp_recvmsg(struct pt_regs *ctx)
{
    __u64 skp = PT_REGS_PARM1(ctx);
    if (!kp_socks.lookup(&skp))
        return 0;
    const char *msg = (const char *)PT_REGS_PARM2(ctx);
    struct recv_args a = {};
    a.sk = skp;
    a.buf = iter_first_user(msg + IMDS_OFF_MSG_ITER, &a.len);
    if (!a.buf)
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    recv_pending.update(&id, &a);
    return 0;
}

int imds_tcp_recvmsg_ret(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct recv_args *ap = recv_pending.lookup(&id);
    if (!ap)
        return 0;
    struct recv_args a = *ap;
    recv_pending.delete(&id);
    long ret = PT_REGS_RC(ctx);
    if (ret <= 0)
        return 0;
    struct watch_key k = {};
    __u16 family = 0;
    if (!sock_dst((const void *)a.sk, &k, &family))
        return 0;
    struct imds_buf *b = imds_scratch();
    if (!b)
        return 0;
    imds_fill_task(&b->ev, IMDS_EV_RECV);
    fill_sock(&b->ev, a.sk, &k, family);
    __u64 seg = a.len < (__u64)ret ? a.len : (__u64)ret;
    __u32 n = imds_copy_user(b, 0, (const void *)a.buf, seg, IMDS_RESPONSE_BYTES);
    b->ev.payload_len = n;
    b->ev.lost_bytes = (__u64)ret > n ? (__u32)((__u64)ret - n) : 0;
    imds_emit(ctx, b);
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->newstate != IMDS_TCP_CLOSE)
        return 0;
    __u64 skp = (__u64)args->skaddr;
    if (!kp_socks.lookup(&skp))
        return 0;
    kp_socks.delete(&skp);
    struct imds_buf *b = imds_scratch();
    if (!b)
        return 0;
    struct watch_key k = {};
    __u16 family = 0;
    sock_dst((const void *)skp, &k, &family);
    imds_fill_task(&b->ev, IMDS_EV_CLOSE);
    fill_sock(&b->ev, skp, &k, family);
    imds_emit(args, b);
    return 0;
}

/* exec-time argv cache (common.h), for processes gone before user space looks */
TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return imds_exec_enter((const char *const *)args->argv);
}
TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
    imds_exec_exit(args->ret);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return imds_exec_enter((const char *const *)args->argv);
}
TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
    imds_exec_exit(args->ret);
    return 0;
}
