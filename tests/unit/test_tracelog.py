import os
import stat

from imds_tracer.model import Container, ProcessInfo, RequestRecord
from imds_tracer.report import _LINE
from imds_tracer.sinks.files import RotatingFile
from imds_tracer.sinks.tracelog import TraceLogSink, format_line


def record(**kw):
    base = dict(time=1795000000.0, level="WARNING", provider="aliyun", mode="normal",
                problems=(), method="GET", path="/latest/meta-data/instance-id",
                version="HTTP/1.1", headers={}, dst_ip="100.100.100.200", dst_port=80,
                status=200, source="tracepoint",
                process=ProcessInfo(1234, "curl", ("curl", "http://100.100.100.200/x")),
                parents=(ProcessInfo(1200, "bash", ("-bash",)),
                         ProcessInfo(1, "systemd", ("/sbin/init",))))
    base.update(kw)
    return RequestRecord(**base)


def test_line_has_the_documented_shape():
    line = format_line(record())
    assert "] [WARNING] normal-mode provider=aliyun GET /latest/meta-data/instance-id " \
           "dst=100.100.100.200:80 status=200 (pid:1234:curl argv:curl " \
           "http://100.100.100.200/x) called by -> (pid:1200:bash argv:-bash) -> " \
           "(pid:1:systemd argv:/sbin/init) container=-" in line
    assert line.startswith("[20")


def test_container_ipv6_problems_and_unknown_process():
    line = format_line(record(level="ERROR", mode="hardened", problems=("ttl_missing",),
                              dst_ip="fd00:ec2::254", process=None, parents=(),
                              container=Container("docker", "ab" * 32, None)))
    assert "problems=ttl_missing" in line and "dst=[fd00:ec2::254]:80" in line
    assert "(pid:-:- argv:-)" in line and line.endswith("container=docker:abababababab")


def test_crafted_argv_and_path_cannot_forge_fields():
    evil = ProcessInfo(66, "ev il", ("sh", "x) container=docker:0000 (pid:1:init argv:init"))
    line = format_line(record(process=evil, path="/a dst=1.2.3.4:80 b", parents=()))
    m = _LINE.match(line)
    assert m and m.group("container") == "-" and m.group("path").startswith("/a\\x20dst")
    assert m.group("comm") == "ev\\x20il"


def test_rotation_modes_and_recreation(tmp_path):
    d = tmp_path / "imds"
    f = RotatingFile(str(d), "imds-trace.log", max_bytes=4096, backups=2)
    for i in range(200):
        assert f.write(f"line {i:04d} " + "x" * 80)
    names = sorted(os.listdir(d))
    assert names == ["imds-trace.log", "imds-trace.log.1", "imds-trace.log.2"]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(d / n).st_mode) == 0o600 for n in names)
    assert os.path.getsize(d / "imds-trace.log") <= 4096
    # the directory removed under the agent: made again on the next write
    for n in names:
        os.unlink(d / n)
    os.rmdir(d)
    assert f.write("after removal")
    assert (d / "imds-trace.log").read_text() == "after removal\n"


def test_reopen_after_external_rotation(tmp_path):
    sink = TraceLogSink(str(tmp_path), max_bytes=1 << 20, backups=1)
    sink.emit(record())
    os.rename(tmp_path / "imds-trace.log", tmp_path / "imds-trace.log.1")
    sink.reopen()   # what SIGHUP does
    sink.emit(record(path="/after"))
    sink.flush()    # what the pipeline's tick does after each poll
    assert "/after" in (tmp_path / "imds-trace.log").read_text()
    assert "/after" not in (tmp_path / "imds-trace.log.1").read_text()
    # the line queued before the signal went to the file logrotate moved, not the new one
    assert (tmp_path / "imds-trace.log.1").read_text().count("\n") == 1


def test_failed_writes_are_counted(tmp_path):
    lost = []
    sink = TraceLogSink(str(tmp_path), on_failure=lost.append)
    os.close(sink.file._fd)
    sink.file._fd = os.open("/dev/full", os.O_WRONLY)
    sink.emit(record())
    sink.flush()
    assert lost == [1] and sink.file.failed == 1
    sink.emit(record())     # reopens the real file and recovers
    sink.flush()
    assert lost == [1]
    assert (tmp_path / "imds-trace.log").read_text().count("\n") == 1


def test_plain_grep_warning_finds_only_normal_mode_lines():
    # SPEC: operators run `cat imds-trace.* | grep WARNING`; a process must not get its
    # hardened-mode request listed by writing the word into its path or argv
    sneaky = record(level="INFO", mode="hardened", path="/latest/WARNING",
                    process=ProcessInfo(9, "WARNING", ("x", "[WARNING]")), parents=())
    line = format_line(sneaky)
    assert "WARNING" not in line and "/latest/WARN\\x49NG" in line
    assert "WARNING" in format_line(record())


def test_json_file_is_rotated_and_private(tmp_path):
    from imds_tracer.sinks.jsonl import JsonLinesSink
    shared = tmp_path / "sub"
    shared.mkdir(mode=0o755)
    out = shared / "requests.jsonl"
    sink = JsonLinesSink(str(out), max_bytes=4096, backups=1)
    for _ in range(40):
        sink.emit(record())
    sink.close()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert (tmp_path / "sub" / "requests.jsonl.1").exists()
    assert all(line.startswith("{") and line.endswith("}")
               for line in out.read_text().splitlines())
    # a --json file in a shared directory leaves that directory's mode alone
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755


def test_drop_summary_at_the_end_of_a_replay_carries_the_capture_time(tmp_path):
    # report reads these lines by time: one stamped 1970 would vanish from every window
    from imds_tracer.agent import Agent
    from imds_tracer.config import Config
    pipeline = Agent(Config(log_dir=str(tmp_path), metrics_addr=None)).pipeline
    pipeline.tick(1795000000.0)
    pipeline.drop("flow_table_full", 3)
    pipeline.flush()
    pipeline.close()
    text = (tmp_path / "imds-trace.log").read_text()
    assert "agent dropped flow_table_full=3" in text and "[1970-" not in text


# -- batched writes: lines are queued and written at flush / reopen / close -----------------
def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_queued_lines_are_written_at_flush_reopen_and_close(tmp_path):
    log = tmp_path / "imds-trace.log"
    sink = TraceLogSink(str(tmp_path))
    sink.emit(record(path="/one"))
    assert _lines(log) == []                 # queued: one write() per batch
    sink.flush()
    assert len(_lines(log)) == 1
    sink.emit(record(path="/two"))
    os.rename(log, tmp_path / "moved.log")
    sink.reopen()                            # SIGHUP: queued lines go to the moved file
    assert "/two" in (tmp_path / "moved.log").read_text() and _lines(log) == []
    sink.emit(record(path="/three"))
    sink.close()                             # SIGTERM / end of replay
    assert len(_lines(log)) == 1 and "/three" in log.read_text()


def test_a_full_queue_is_written_without_waiting(tmp_path):
    from imds_tracer.sinks.files import PENDING_MAX
    f = RotatingFile(str(tmp_path), "x.log", max_bytes=1 << 20, backups=1)
    for i in range(PENDING_MAX):
        assert f.add(f"line {i}") == 0
    assert len(_lines(tmp_path / "x.log")) == PENDING_MAX


def test_a_batch_rotates_where_line_by_line_writes_would(tmp_path):
    lines = [f"line {i:04d} " + "x" * (i % 97) for i in range(400)]
    one, batch = tmp_path / "one", tmp_path / "batch"
    a = RotatingFile(str(one), "t.log", max_bytes=4096, backups=3)
    for line in lines:
        assert a.write(line)                 # a flush per line
    b = RotatingFile(str(batch), "t.log", max_bytes=4096, backups=3)
    for line in lines[:150]:
        b.add(line)
    assert b.flush() == 0
    for line in lines[150:]:
        b.add(line)
    b.close()
    names = sorted(os.listdir(one))
    assert names == sorted(os.listdir(batch)) == ["t.log", "t.log.1", "t.log.2", "t.log.3"]
    for name in names:
        assert (one / name).read_bytes() == (batch / name).read_bytes()
        assert os.path.getsize(batch / name) <= 4096


def test_a_write_cut_short_keeps_whole_lines_and_counts_the_rest(tmp_path, monkeypatch):
    import imds_tracer.sinks.files as files
    real_write = os.write
    monkeypatch.setattr(files.os, "write", lambda fd, data: real_write(fd, data[:25]))
    lost = []
    sink = TraceLogSink(str(tmp_path), on_failure=lost.append)
    for text in ("0123456789", "abcdefghij", "klmnopqrst"):
        sink._write(text)
    sink.flush()                             # 25 bytes: two whole lines and half a third
    assert lost == [1] and sink.file.failed == 1
    assert (tmp_path / "imds-trace.log").read_text() == "0123456789\nabcdefghij\n"
    monkeypatch.setattr(files.os, "write", real_write)
    sink._write("after")
    sink.close()
    assert (tmp_path / "imds-trace.log").read_text() == "0123456789\nabcdefghij\nafter\n"


def test_the_pipeline_writes_the_log_at_each_tick_and_at_shutdown(tmp_path):
    from imds_tracer.agent import Agent
    from imds_tracer.config import Config
    from imds_tracer.model import Chunk, Direction
    pipeline = Agent(Config(log_dir=str(tmp_path), metrics_addr=None)).pipeline
    log = tmp_path / "imds-trace.log"

    def request(flow, path):
        pipeline.take([Chunk(flow, Direction.REQUEST, b"GET " + path + b" HTTP/1.1\r\n\r\n",
                             1795000000.0, "169.254.169.254", 80, "test"),
                       Chunk(flow, Direction.RESPONSE, b"HTTP/1.1 200 OK\r\n\r\n",
                             1795000000.0, "169.254.169.254", 80, "test")])

    request(1, b"/latest/one")
    assert _lines(log) == []
    pipeline.tick(1795000000.5)              # the end of a poll
    assert len(_lines(log)) == 1
    request(2, b"/latest/two")
    pipeline.flush(1795000001.0)             # what SIGTERM does, then close
    pipeline.close()
    assert len(_lines(log)) == 2


def test_timestamp_is_the_second_datetime_gives(monkeypatch):
    from datetime import datetime

    from imds_tracer.sinks.tracelog import timestamp
    for ts in (1795000000.0, 1795000000.5, 1795000000.999998, 1795000000.9999994,
               1795000000.9999996, 1795000001.0, 1795000001.0000001, 0.25):
        expected = datetime.fromtimestamp(ts).replace(microsecond=0).astimezone()
        assert timestamp(ts) == expected.isoformat(timespec="seconds"), ts
