/* Tracepoint backend: syscall tracepoints only, so it runs on kernels without kprobes and with
 * headers that are not the running kernel's. Everything read comes from tracepoint arguments
 * and user memory (sockaddr, iovec, user_msghdr are UAPI layouts); no kernel struct is
 * dereferenced.
 *
 * Which (tgid, fd) talks to a metadata address is learnt at connect() (the destination is
 * filtered here, against `watched`, filled by user space from the config) and by the start-up
 * scan in user space for sockets connected before the agent started. Sends are copied at
 * syscall exit, with the byte count the kernel accepted (a send that failed with EAGAIN and is
 * retried is not seen twice); receives likewise, first IMDS_RESPONSE_BYTES only.
 */
#include "common.h"


struct conn_val {
    __u64 conn_id;
    __u64 epoch;    /* the process's epoch when the fd was tracked: exec/exit start a new one */
    __u16 family;
    __u16 dport;
    __u32 pad;
    __u8 daddr[16];
};

struct connect_args {
    __u32 fd;
    __u16 family;
    __u16 dport;
    __u8 daddr[16];
};

#define IO_PLAIN 0    /* one buffer: write, read, sendto, recvfrom */
#define IO_IOVEC 1    /* iovec array: writev, readv, sendmsg, recvmsg */

struct io_args {
    __u64 ptr;      /* buffer, or iovec array */
    __u64 count;    /* buffer length, or iovec count */
    __u32 fd;
    __u32 how;
};

/* (tgid << 32 | fd) -> connection; LRU so that a process that never closes cannot fill it */
BPF_TABLE("lru_hash", __u64, struct conn_val, conns, 65536);
/* tgid -> epoch of its tracked fds; deleted at exec and exit, which makes the fds stale */
BPF_TABLE("lru_hash", __u32, __u64, tgid_epoch, 16384);
BPF_HASH(connect_pending, __u64, struct connect_args, 4096);
BPF_HASH(io_pending, __u64, struct io_args, 4096);

/* The first test on the hot path. Every write/read/close on the machine runs these programs,
 * nearly all of them for processes that never talked to a metadata address. A slot here is set
 * when a process whose tgid maps to it gets a metadata connection (connect or the start-up
 * scan) and is never cleared: a false positive only costs the hash lookups that follow, while
 * an array lookup is inlined by the JIT and the hash lookups are not. */
#define IMDS_TGID_SLOTS 65536
BPF_ARRAY(maybe_tracked, __u8, IMDS_TGID_SLOTS);

static __always_inline int tgid_maybe_tracked(__u32 tgid)
{
    __u32 slot = tgid & (IMDS_TGID_SLOTS - 1);
    __u8 *flag = maybe_tracked.lookup(&slot);
    return flag && *flag;
}

static __always_inline void mark_tgid_tracked(__u32 tgid)
{
    __u32 slot = tgid & (IMDS_TGID_SLOTS - 1);
    __u8 one = 1;
    maybe_tracked.update(&slot, &one);
}

static __always_inline __u64 fd_key(__u32 tgid, __u32 fd)
{
    return ((__u64)tgid << 32) | fd;
}

static __always_inline __u64 new_conn_id(void)
{
    /* unique without atomics (BPF_ATOMIC_FETCH needs 5.12): ns clock + CPU */
    return (bpf_ktime_get_ns() << 8) | (bpf_get_smp_processor_id() & 0xff);
}

/* The tracked connection of fd in the current process, or NULL. A stale entry (the process
 * exec'd or exited and its fd number was reused) is forgotten here. */
static __always_inline struct conn_val *tracked(__u32 fd)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tgid_maybe_tracked(tgid))
        return 0;
    __u64 key = fd_key(tgid, fd);
    struct conn_val *c = conns.lookup(&key);
    if (!c)
        return 0;
    __u64 *epoch = tgid_epoch.lookup(&tgid);
    if (!epoch || *epoch != c->epoch) {
        conns.delete(&key);
        imds_count(IMDS_CNT_STALE_FD);
        return 0;
    }
    return c;
}

static __always_inline void fill_dst(struct imds_event *ev, struct conn_val *c, __u32 fd)
{
    ev->conn_id = c->conn_id;
    ev->family = c->family;
    ev->dport = c->dport;
    ev->fd = fd;
    __builtin_memcpy(ev->daddr, c->daddr, 16);
}

static __always_inline int emit_close(void *ctx, __u32 fd, struct conn_val *c)
{
    struct imds_buf *b = imds_scratch();
    if (!b)
        return 0;
    imds_fill_task(&b->ev, IMDS_EV_CLOSE);
    fill_dst(&b->ev, c, fd);
    b->ev.fd_last = fd;
    imds_emit(ctx, b);
    return 0;
}

static __always_inline int forget_fd(void *ctx, __u32 fd)
{
    struct conn_val *c = tracked(fd);
    if (!c)
        return 0;
    struct conn_val copy = *c;
    __u64 key = fd_key(bpf_get_current_pid_tgid() >> 32, fd);
    conns.delete(&key);
    return emit_close(ctx, fd, &copy);
}

/* ---- connect ----------------------------------------------------------------------------- */

TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    struct connect_args a = {};
    struct watch_key k = {};
    __u16 family = 0;
    const void *sa = (const void *)args->uservaddr;
    if (bpf_probe_read_user(&family, sizeof(family), sa) != 0)
        return 0;
    if (family == IMDS_AF_INET) {
        /* struct sockaddr_in: family(2) port(2) addr(4) */
        __u16 port = 0;
        __u32 addr = 0;
        bpf_probe_read_user(&port, sizeof(port), sa + 2);
        bpf_probe_read_user(&addr, sizeof(addr), sa + 4);
        k.addr[10] = 0xff;
        k.addr[11] = 0xff;
        __builtin_memcpy(&k.addr[12], &addr, 4);
        k.port = __builtin_bswap16(port);
    } else if (family == IMDS_AF_INET6) {
        /* struct sockaddr_in6: family(2) port(2) flowinfo(4) addr(16) */
        __u16 port = 0;
        bpf_probe_read_user(&port, sizeof(port), sa + 2);
        bpf_probe_read_user(&k.addr, sizeof(k.addr), sa + 8);
        k.port = __builtin_bswap16(port);
    } else {
        return 0;
    }
    __u32 fd = args->fd;
    if (!watched.lookup(&k)) {
        /* the fd now talks elsewhere: forget it if it was tracked */
        forget_fd(args, fd);
        return 0;
    }
    a.fd = fd;
    a.family = family;
    a.dport = k.port;
    __builtin_memcpy(a.daddr, k.addr, 16);
    __u64 id = bpf_get_current_pid_tgid();
    connect_pending.update(&id, &a);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct connect_args *a = connect_pending.lookup(&id);
    if (!a)
        return 0;
    long ret = args->ret;
    /* curl connects non-blocking: -EINPROGRESS is a connection under way */
    if (ret != 0 && ret != -IMDS_EINPROGRESS) {
        connect_pending.delete(&id);
        return 0;
    }
    __u32 tgid = id >> 32;
    struct conn_val c = {};
    c.conn_id = new_conn_id();
    __u64 *epoch = tgid_epoch.lookup(&tgid);
    if (epoch) {
        c.epoch = *epoch;
    } else {
        c.epoch = c.conn_id;
        tgid_epoch.update(&tgid, &c.epoch);
    }
    c.family = a->family;
    c.dport = a->dport;
    __builtin_memcpy(c.daddr, a->daddr, 16);
    __u32 fd = a->fd;
    connect_pending.delete(&id);
    __u64 key = fd_key(tgid, fd);
    conns.update(&key, &c);
    mark_tgid_tracked(tgid);

    struct imds_buf *b = imds_scratch();
    if (!b)
        return 0;
    imds_fill_task(&b->ev, IMDS_EV_CONNECT);
    fill_dst(&b->ev, &c, fd);
    imds_put_argv(b);
    imds_emit(args, b);
    return 0;
}

/* ---- send and receive: remember the buffer at enter, copy at exit ------------------------ */

static __always_inline int io_enter(__u32 fd, const void *ptr, __u64 count, __u32 how)
{
    if (!tracked(fd))
        return 0;
    struct io_args a = {};
    a.ptr = (__u64)ptr;
    a.count = count;
    a.fd = fd;
    a.how = how;
    __u64 id = bpf_get_current_pid_tgid();
    io_pending.update(&id, &a);
    return 0;
}

static __always_inline int msg_enter(__u32 fd, const void *msg)
{
    if (!tracked(fd))
        return 0;
    /* struct user_msghdr (UAPI): name(8) namelen(4+pad) iov(8) at 16, iovlen(8) at 24 */
    __u64 iov = 0, iovlen = 0;
    bpf_probe_read_user(&iov, sizeof(iov), msg + 16);
    bpf_probe_read_user(&iovlen, sizeof(iovlen), msg + 24);
    return io_enter(fd, (const void *)iov, iovlen, IO_IOVEC);
}

static __always_inline int io_exit(void *ctx, long ret, __u16 kind)
{
    __u64 id = bpf_get_current_pid_tgid();
    if (!tgid_maybe_tracked(id >> 32))
        return 0;  /* io_enter saves only for tracked fds, whose slot is set */
    struct io_args *ap = io_pending.lookup(&id);
    if (!ap)
        return 0;
    struct io_args a = *ap;
    io_pending.delete(&id);
    if (ret <= 0)
        return 0;
    struct conn_val *c = tracked(a.fd);
    if (!c)
        return 0;
    struct imds_buf *b = imds_scratch();
    if (!b)
        return 0;
    imds_fill_task(&b->ev, kind);
    fill_dst(&b->ev, c, a.fd);

    __u32 limit = kind == IMDS_EV_SEND ? IMDS_PAYLOAD_LIMIT : IMDS_RESPONSE_BYTES;
    __u64 left = ret;      /* bytes the kernel actually moved */
    __u32 off = 0;
    if (a.how == IO_PLAIN) {
        off = imds_copy_user(b, 0, (const void *)a.ptr, left, limit);
    } else {
        off = imds_copy_iovecs(b, a.ptr, a.count, 0, left, limit, 0);
    }
    b->ev.payload_len = off;
    b->ev.lost_bytes = (__u64)ret > off ? (__u32)((__u64)ret - off) : 0;
    if (kind == IMDS_EV_SEND && b->ev.lost_bytes)
        imds_count(IMDS_CNT_SENDS_TRUNCATED);
    imds_emit(ctx, b);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_write)
{
    return io_enter(args->fd, args->buf, args->count, IO_PLAIN);
}
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return io_exit(args, args->ret, IMDS_EV_SEND); }

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
    return io_enter(args->fd, args->buff, args->len, IO_PLAIN);
}
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return io_exit(args, args->ret, IMDS_EV_SEND); }

TRACEPOINT_PROBE(syscalls, sys_enter_writev)
{
    return io_enter(args->fd, args->vec, args->vlen, IO_IOVEC);
}
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return io_exit(args, args->ret, IMDS_EV_SEND); }

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return msg_enter(args->fd, args->msg); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return io_exit(args, args->ret, IMDS_EV_SEND); }

TRACEPOINT_PROBE(syscalls, sys_enter_read)
{
    return io_enter(args->fd, args->buf, args->count, IO_PLAIN);
}
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return io_exit(args, args->ret, IMDS_EV_RECV); }

TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom)
{
    return io_enter(args->fd, args->ubuf, args->size, IO_PLAIN);
}
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return io_exit(args, args->ret, IMDS_EV_RECV); }

TRACEPOINT_PROBE(syscalls, sys_enter_readv)
{
    return io_enter(args->fd, args->vec, args->vlen, IO_IOVEC);
}
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return io_exit(args, args->ret, IMDS_EV_RECV); }

TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return msg_enter(args->fd, args->msg); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return io_exit(args, args->ret, IMDS_EV_RECV); }

/* ---- the fd goes away -------------------------------------------------------------------- */

TRACEPOINT_PROBE(syscalls, sys_enter_close) { return forget_fd(args, args->fd); }

TRACEPOINT_PROBE(syscalls, sys_enter_dup2) { return forget_fd(args, args->newfd); }

TRACEPOINT_PROBE(syscalls, sys_enter_dup3) { return forget_fd(args, args->newfd); }

TRACEPOINT_PROBE(syscalls, sys_enter_close_range)
{
    /* cannot walk the map here: tell user space, which knows the process's tracked fds */
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tgid_epoch.lookup(&tgid))
        return 0;
    struct imds_buf *b = imds_scratch();
    if (!b)
        return 0;
    imds_fill_task(&b->ev, IMDS_EV_CLOSE);
    b->ev.conn_id = 0;
    b->ev.fd = args->fd;
    b->ev.fd_last = args->max_fd;
    imds_emit(args, b);
    return 0;
}

static __always_inline int reset_tgid(void *ctx)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tgid_epoch.lookup(&tgid))
        return 0;
    tgid_epoch.delete(&tgid);
    struct imds_buf *b = imds_scratch();
    if (!b)
        return 0;
    imds_fill_task(&b->ev, IMDS_EV_TGID_RESET);
    b->ev.conn_id = 0;
    imds_emit(ctx, b);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return imds_exec_enter((const char *const *)args->argv);
}
TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
    if (imds_exec_exit(args->ret))
        reset_tgid(args);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return imds_exec_enter((const char *const *)args->argv);
}
TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
    if (imds_exec_exit(args->ret))
        reset_tgid(args);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    /* the leader's exit: the process is going (threads exiting alone keep the fds) */
    __u64 id = bpf_get_current_pid_tgid();
    if ((__u32)id != (__u32)(id >> 32))
        return 0;
    return reset_tgid(args);
}
