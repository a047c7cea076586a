/* Shared by tracepoint.c and kprobe.c: the output channel, drop counters, the per-CPU scratch
 * event, and the process cache (argv at exec, parent at fork) that lets user space name a
 * process that exited microseconds after its request.
 *
 * Only tracepoint arguments and user memory are read here: no kernel struct is dereferenced.
 *
 * Compile-time settings (passed by imds_tracer/sources/kernel.py as -D flags):
 *   IMDS_PAYLOAD_LIMIT   bytes copied per send (config capture.max_payload)
 *   IMDS_PAYLOAD_CAP     power of two >= IMDS_PAYLOAD_LIMIT and >= IMDS_ARGV_BUF
 *   IMDS_RESPONSE_BYTES  bytes copied per receive (the status line is all we need)
 *   IMDS_RING_PAGES      ring buffer pages (power of two); IMDS_USE_PERF selects a perf buffer
 *   IMDS_NCPU            possible CPUs (scratch slots)
 */
#ifndef IMDS_COMMON_H
#define IMDS_COMMON_H

#include "event.h"

#ifndef IMDS_PAYLOAD_LIMIT
#define IMDS_PAYLOAD_LIMIT 4096
#endif
#ifndef IMDS_PAYLOAD_CAP
#define IMDS_PAYLOAD_CAP 4096
#endif
#ifndef IMDS_RESPONSE_BYTES
#define IMDS_RESPONSE_BYTES 256
#endif
#ifndef IMDS_RING_PAGES
#define IMDS_RING_PAGES 512
#endif
#ifndef IMDS_NCPU
#define IMDS_NCPU 64
#endif
#ifndef IMDS_PROC_ENTRIES
#define IMDS_PROC_ENTRIES 8192
#endif

#define IMDS_AF_INET 2
#define IMDS_AF_INET6 10
#define IMDS_EINPROGRESS 115

/* argv cache: arguments NUL-separated, at most IMDS_ARGV_ARGS of them, each at most
 * IMDS_ARG_BYTES, stopping once IMDS_ARGV_LIMIT bytes are used. 1-D array on purpose: BCC's
 * ctypes mirror of a 2-D char array is too small (SPEC §6). */
#define IMDS_ARGV_ARGS 20
#define IMDS_ARG_BYTES 256
#define IMDS_ARGV_LIMIT 1024           /* power of two: offsets are masked with LIMIT - 1 */
#define IMDS_ARGV_BUF (IMDS_ARGV_LIMIT + IMDS_ARG_BYTES)

struct imds_argv {
    __u32 len;
    __u16 argc;
    __u16 truncated;
    char buf[IMDS_ARGV_BUF];
};

struct imds_buf {
    struct imds_event ev;
    /* twice the cap: a masked offset (< CAP) plus a clamped length (<= CAP) always fits,
     * which is what the verifier needs to see */
    __u8 payload[2 * IMDS_PAYLOAD_CAP];
};

/* the (address, port) pairs to capture, filled by user space from the config */
struct watch_key {
    __u8 addr[16];  /* IPv4 as v4-mapped */
    __u32 port;     /* host order */
};
BPF_HASH(watched, struct watch_key, __u8, 64);

#ifdef IMDS_USE_PERF
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, IMDS_RING_PAGES);
#endif
BPF_PERCPU_ARRAY(counters, __u64, IMDS_CNT_SLOTS);
/* indexed by CPU rather than per-CPU: a per-CPU value is limited to 32 KiB */
BPF_ARRAY(scratch, struct imds_buf, IMDS_NCPU);
BPF_PERCPU_ARRAY(argv_scratch, struct imds_argv, 1);
BPF_HASH(exec_pending, __u32, struct imds_argv, 1024);
BPF_TABLE("lru_hash", __u32, struct imds_argv, argv_cache, IMDS_PROC_ENTRIES);
BPF_TABLE("lru_hash", __u32, __u32, parent_of, IMDS_PROC_ENTRIES * 4);

static __always_inline void imds_count(__u32 slot)
{
    __u64 *val = counters.lookup(&slot);
    if (val)
        (*val)++;
}

static __always_inline struct imds_buf *imds_scratch(void)
{
    __u32 cpu = bpf_get_smp_processor_id();
    return scratch.lookup(&cpu);
}

/* Fills the header fields that describe the current task. */
static __always_inline void imds_fill_task(struct imds_event *ev, __u16 kind)
{
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    ev->ts_ns = bpf_ktime_get_ns();
    ev->tgid = tgid;
    ev->tid = (__u32)pid_tgid;
    ev->uid = (__u32)bpf_get_current_uid_gid();
    ev->cgroup_id = bpf_get_current_cgroup_id();
    ev->kind = kind;
    ev->flags = 0;
    ev->payload_len = 0;
    ev->lost_bytes = 0;
    ev->fd_last = 0;
    __u32 *ppid = parent_of.lookup(&tgid);
    ev->ppid = ppid ? *ppid : 0;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
}

/* Submits the header plus payload_len bytes; a failure is counted, never silent. */
static __always_inline void imds_emit(void *ctx, struct imds_buf *b)
{
    /* 64-bit and checked after the barrier: with a 32-bit length clang compares a
     * zero-extended copy and passes the unchecked register to the helper */
    __u64 size = (__u64)b->ev.payload_len + sizeof(struct imds_event);
    asm volatile("" : "+r"(size));
    if (size > sizeof(*b))
        size = sizeof(*b);
#ifdef IMDS_USE_PERF
    if (events.perf_submit(ctx, b, size) < 0)
        imds_count(IMDS_CNT_OUTPUT_FAILED);
#else
    if (events.ringbuf_output(b, size, 0) < 0)
        imds_count(IMDS_CNT_OUTPUT_FAILED);
#endif
}

/* Copies at most `len` user bytes from `src` to payload[off], never past `limit` (<= CAP).
 * Returns the number of bytes copied. The barrier and the mask keep clang from folding the
 * bounds away before the verifier sees them (SPEC §6). */
static __always_inline __u32 imds_copy_user(struct imds_buf *b, __u32 off, const void *src,
                                            __u64 len, __u32 limit)
{
    if (off >= limit || len == 0)
        return 0;
    __u64 room = limit - off;
    __u64 n = len < room ? len : room;
    asm volatile("" : "+r"(n));
    if (n > IMDS_PAYLOAD_CAP)
        n = IMDS_PAYLOAD_CAP;
    __u64 o = off;
    asm volatile("" : "+r"(o));
    o &= IMDS_PAYLOAD_CAP - 1;
    if (bpf_probe_read_user(&b->payload[o], n, src) != 0)
        return 0;
    return n;
}

#define IMDS_MAX_IOV 8

/* Copies the first bytes of an iovec array (writev, sendmsg, readv, recvmsg): at most
 * IMDS_MAX_IOV segments, `left` bytes, into payload[0..limit). The array itself is in user
 * memory for a syscall's arguments and in kernel memory for an iov_iter (kprobe backend);
 * `skip` bytes of the first segment were already consumed (iov_iter.iov_offset). Returns
 * the number of bytes copied. */
static __always_inline __u32 imds_copy_iovecs(struct imds_buf *b, __u64 iov, __u64 nr,
                                              __u64 skip, __u64 left, __u32 limit,
                                              int array_in_kernel)
{
    __u32 off = 0;
    int i;
#pragma unroll
    for (i = 0; i < IMDS_MAX_IOV; i++) {
        if (i >= nr || left == 0 || off >= limit)
            break;
        struct { __u64 base; __u64 len; } v = {};
        const void *at = (const void *)(iov + i * 16);
        long err = array_in_kernel ? bpf_probe_read_kernel(&v, sizeof(v), at)
                                   : bpf_probe_read_user(&v, sizeof(v), at);
        if (err != 0)
            break;
        if (i == 0 && skip) {
            v.base += skip;
            v.len = v.len > skip ? v.len - skip : 0;
        }
        __u64 seg = v.len < left ? v.len : left;
        __u32 n = imds_copy_user(b, off, (const void *)v.base, seg, limit);
        off += n;
        left -= seg;
        if (n < seg)
            break;
    }
    return off;
}

/* ---- process cache: argv at exec, parent at fork --------------------------------------- */

static __always_inline int imds_exec_enter(const char *const *argv)
{
    __u32 zero = 0;
    struct imds_argv *v = argv_scratch.lookup(&zero);
    if (!v)
        return 0;
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    __u32 off = 0;
    v->argc = 0;
    v->truncated = 0;
    int i;
#pragma unroll
    for (i = 0; i < IMDS_ARGV_ARGS; i++) {
        const char *arg = 0;
        if (bpf_probe_read_user(&arg, sizeof(arg), &argv[i]) != 0 || !arg)
            break;
        if (off >= IMDS_ARGV_LIMIT) {
            v->truncated = 1;
            break;
        }
        __u64 o = off;
        asm volatile("" : "+r"(o));
        o &= IMDS_ARGV_LIMIT - 1;
        long n = bpf_probe_read_user_str(&v->buf[o], IMDS_ARG_BYTES, arg);
        if (n <= 0)
            break;
        if (n == IMDS_ARG_BYTES)
            v->truncated = 1;
        off = o + (__u32)n;
        v->argc++;
    }
    if (i == IMDS_ARGV_ARGS) {
        const char *more = 0;
        if (bpf_probe_read_user(&more, sizeof(more), &argv[IMDS_ARGV_ARGS]) == 0 && more)
            v->truncated = 1;
    }
    v->len = off;
    exec_pending.update(&tgid, v);
    return 0;
}

/* Called at sys_exit_execve(at): the argv becomes the process's only if the exec worked.
 * Returns 1 when the exec succeeded (the caller then forgets the process's tracked fds). */
static __always_inline int imds_exec_exit(long ret)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct imds_argv *v = exec_pending.lookup(&tgid);
    if (ret != 0) {
        if (v)
            exec_pending.delete(&tgid);
        return 0;
    }
    if (v) {
        if (v->truncated)
            imds_count(IMDS_CNT_ARGV_TRUNCATED);
        argv_cache.update(&tgid, v);
        exec_pending.delete(&tgid);
    }
    return 1;
}

/* sched:sched_process_fork, attached by user space. Its format changed in 6.x (comm became
 * __data_loc, which BCC 0.26 cannot turn into a struct), so user space reads the offset of
 * child_pid from the tracepoint's format file (an ABI, not a kernel struct) and passes it as
 * IMDS_FORK_CHILD_PID_OFF. Runs in the parent: the current tgid is the parent process (also
 * for new threads, whose entries are harmless: tid -> own tgid). */
#ifndef IMDS_FORK_CHILD_PID_OFF
#define IMDS_FORK_CHILD_PID_OFF 44   /* before 6.x: char parent_comm[16] ... pid_t child_pid */
#endif
int imds_on_fork(void *ctx)
{
    __u32 child = 0;
    bpf_probe_read_kernel(&child, sizeof(child), (char *)ctx + IMDS_FORK_CHILD_PID_OFF);
    __u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (child)
        parent_of.update(&child, &parent);
    return 0;
}

/* Puts the current process's cached argv into the event payload. */
static __always_inline void imds_put_argv(struct imds_buf *b)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct imds_argv *v = argv_cache.lookup(&tgid);
    if (!v) {
        b->ev.flags |= IMDS_F_NO_ARGV;
        return;
    }
    __u64 len = v->len;
    asm volatile("" : "+r"(len));
    if (len > IMDS_ARGV_BUF)
        len = IMDS_ARGV_BUF;
    /* map value to map value in 8-byte words, no helper: socket programs (cgroup backend)
     * may not call the probe-read helpers, and BCC turns bpf_probe_read_kernel into
     * bpf_probe_read when it cannot confirm the former (e.g. without CAP_SYSLOG) */
    __u64 *dst = (__u64 *)b->payload;
    const __u64 *src = (const __u64 *)v->buf;
#pragma unroll
    for (int i = 0; i < IMDS_ARGV_BUF / 8; i++)
        dst[i] = src[i];
    b->ev.payload_len = len;
    if (v->truncated)
        b->ev.flags |= IMDS_F_ARGV_TRUNCATED;
}

#endif
