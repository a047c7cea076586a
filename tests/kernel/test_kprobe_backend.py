"""The kprobe backend cannot attach on these kernels (no CONFIG_KPROBES), so: compile it with
this kernel's BTF offsets and load every program through the verifier without attaching; check
that starting it fails loudly with the fix; check that `auto` falls back to tracepoint."""
from __future__ import annotations

import logging

import pytest

from imds_tracer.config import Config
from imds_tracer.sources.base import SourceError

PROGRAMS = ("imds_tcp_sendmsg", "imds_tcp_recvmsg", "imds_tcp_recvmsg_ret")


def kprobe_flags(config: Config) -> list[str]:
    """What the loader compiles kprobe.c with (BTF offsets included)."""
    from imds_tracer.sources import loader
    spec = dict(loader.spec_of(config, use_perf=False, keep_caps=0), backend="kprobe")
    return loader.compile_flags(spec) + loader._kprobe_cflags(loader.Job(spec))


def test_kprobe_programs_pass_the_verifier():
    from bcc import BPF
    from imds_tracer.sources.loader import load_bpf
    flags = kprobe_flags(Config())
    assert any(f.startswith("-DIMDS_OFF_ITER_UBUF=") for f in flags)
    bpf = load_bpf("kprobe.c", flags)
    try:
        for name in PROGRAMS:
            fn = bpf.load_func(name.encode(), BPF.KPROBE)
            assert fn.fd >= 0, name
    finally:
        bpf.cleanup()


@pytest.mark.parametrize("max_payload", [256, 4096, 16384])
def test_kprobe_program_loads_with_every_payload_size(max_payload):
    from bcc import BPF
    from imds_tracer.sources.loader import load_bpf
    bpf = load_bpf("kprobe.c", kprobe_flags(Config(max_payload=max_payload)))
    try:
        bpf.load_func(b"imds_tcp_sendmsg", BPF.KPROBE)
    finally:
        bpf.cleanup()


def test_kprobe_program_refuses_to_compile_without_btf_offsets():
    from imds_tracer.sources.loader import compile_flags, load_bpf, spec_of
    with pytest.raises(SourceError):
        load_bpf("kprobe.c", compile_flags(spec_of(Config(), use_perf=False, keep_caps=0)))


def test_start_without_kprobes_is_a_one_line_error():
    from imds_tracer.sources.kprobe import KprobeSource
    if KprobeSource.unavailable_reason() is None:
        pytest.skip("this kernel has kprobes")
    src = KprobeSource(Config())
    with pytest.raises(SourceError) as info:
        src.start()
    message = str(info.value)
    assert "\n" not in message
    assert "--backend tracepoint" in message and "doctor" in message
    assert src.maps == {} and src._fds == []   # nothing handed over, nothing left loaded


def test_auto_prefers_the_cgroup_backend(caplog):
    from imds_tracer.sources.select import open_source
    caplog.set_level(logging.INFO, logger="imds_tracer")
    src = open_source(Config(), "auto", drop_privileges=False)
    try:
        assert src.name == "cgroup"
        assert "using cgroup" in caplog.text
    finally:
        src.stop()


def test_auto_falls_back_to_tracepoint(caplog, monkeypatch):
    from imds_tracer.sources.cgroup import CgroupSource
    from imds_tracer.sources.select import open_source
    from imds_tracer.sources.kprobe import KprobeSource
    caplog.set_level(logging.INFO, logger="imds_tracer")
    # as on a machine without a cgroup v2 hierarchy
    monkeypatch.setattr(CgroupSource, "unavailable_reason", classmethod(lambda cls: "no v2"))
    src = open_source(Config(), "auto", drop_privileges=False)
    try:
        expected = "kprobe" if KprobeSource.unavailable_reason() is None else "tracepoint"
        assert src.name == expected
        assert src.start() == src.probes > 0       # already started: start() is idempotent
        assert f"using {expected}" in caplog.text
    finally:
        src.stop()


def test_explicit_kprobe_backend_does_not_fall_back():
    from imds_tracer.sources.select import open_source
    from imds_tracer.sources.kprobe import KprobeSource
    if KprobeSource.unavailable_reason() is None:
        pytest.skip("this kernel has kprobes")
    with pytest.raises(SourceError, match="kprobe"):
        open_source(Config(), "kprobe", drop_privileges=False)
