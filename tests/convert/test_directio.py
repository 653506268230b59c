"""The direct copy mode (``directio.DirectStream`` under ``hashcopy.HashingWriter``) against the
plain reference: the bytes on disk and the digest are those of the stream appended, every full
staging buffer really goes out with ``O_DIRECT`` (and only the tail through the page cache), an
alignment the filesystem refuses falls back to the page cache, an error on a writer thread
(ENOSPC, real on a full tmpfs, or injected) surfaces as the one OSError and stops the threads,
and a conversion through many buffers writes what the user-space copy writes, manifest
digests included."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import threading

import pytest

from mhc_convert import directio, engine, hashcopy
from mhc_convert.hooks import Hooks
from tests.convert.test_faults import assert_failed_cleanly, convert, tmpfs, tree_sha
from tests.convert.test_faults import dist as dist  # noqa: F401  (a fixture)
from tests.convert.test_one_pass import _build, _digests

SMALL = 2 * directio.ALIGN  # many buffers from a tiny fixture


@pytest.fixture
def small_buffers(monkeypatch):
    monkeypatch.setattr(directio, "BUF", SMALL)
    monkeypatch.setattr(directio, "NBUF", 3)  # buffers are reused: waits on both consumers


def _journal(monkeypatch) -> list[tuple[int, int, bool]]:
    """(offset, length, O_DIRECT on) of every ``os.pwrite``."""
    seen: list[tuple[int, int, bool]] = []
    real = os.pwrite
    lock = threading.Lock()

    def spy(fd, data, offset):
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        with lock:
            seen.append((offset, len(data), direct))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return seen


def _stream_file(path, pieces: list[bytes], src: bytes) -> tuple[int, str]:
    """``pieces`` appended with ``write`` and ``src`` copied with ``copy_range`` in between."""
    src_path = path.with_suffix(".src")
    src_path.write_bytes(src)
    fd = os.open(src_path, os.O_RDONLY)
    try:
        with hashcopy.output_file(path) as w:
            assert w._direct is not None  # ext4 under /tmp takes O_DIRECT
            for i, piece in enumerate(pieces):
                w.write(piece)
                if i == 1:
                    w.copy_range(fd, 3, len(src) - 3, lambda missing: None)
            got = w.finish()  # output_file's own finish after it writes nothing more
        return got
    finally:
        os.close(fd)


def test_stream_bytes_digest_and_direct_writes(tmp_path, small_buffers, monkeypatch):
    rng = random.Random(0)
    pieces = [rng.randbytes(n) for n in (5, SMALL - 1, 3 * SMALL + 17, 1, 2 * SMALL)]
    src = rng.randbytes(5 * SMALL + 11)
    want = pieces[0] + pieces[1] + src[3:] + b"".join(pieces[2:])
    writes = _journal(monkeypatch)
    size, digest = _stream_file(tmp_path / "out.bin", pieces, src)
    assert (tmp_path / "out.bin").read_bytes() == want
    assert (size, digest) == (len(want), hashlib.sha256(want).hexdigest())
    full, tail = divmod(len(want), SMALL)
    direct = sorted((o, n) for o, n, d in writes if d)
    assert direct == [(i * SMALL, SMALL) for i in range(full)]  # every full buffer, once
    assert [(o, n) for o, n, d in writes if not d] == [(full * SMALL, tail)]


def _refuse_under_direct(monkeypatch, before_refusal=None):
    """os.pwrite refuses (EINVAL) any write while the file is under O_DIRECT, after running
    ``before_refusal`` (an interleaved step of the other writer)."""
    real = os.pwrite

    def pwrite(fd, buf, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            if before_refusal is not None:
                before_refusal()
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


@pytest.fixture
def direct_stream(tmp_path):
    """(fd, DirectStream) over tmp_path / out.bin with O_DIRECT on; the fd is closed after."""
    fd = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT)
    try:
        assert directio.try_direct(fd)
        yield fd, directio.DirectStream(fd)
    finally:
        os.close(fd)


def test_einval_under_o_direct_falls_back_to_the_page_cache(tmp_path, small_buffers,
                                                             monkeypatch):
    """A filesystem that takes O_DIRECT in ``fcntl`` but refuses the write: same bytes."""
    _refuse_under_direct(monkeypatch)
    data = random.Random(1).randbytes(4 * SMALL + 5)
    size, digest = _stream_file(tmp_path / "out.bin", [data[:9], data[9:]], b"")
    assert (tmp_path / "out.bin").read_bytes() == data
    assert digest == hashlib.sha256(data).hexdigest()


def test_einval_racing_the_other_writers_fallback_is_retried(tmp_path, monkeypatch,
                                                             direct_stream):
    """Two writers: one write is refused under O_DIRECT while the other writer has already
    switched the file to the page cache; it is retried there, not raised (this race failed
    test_einval_under_o_direct_falls_back_to_the_page_cache about one run in two)."""
    fd, stream = direct_stream
    data = random.Random(2).randbytes(directio.ALIGN)
    # the other writer's fallback, between this write and its refusal
    _refuse_under_direct(monkeypatch, before_refusal=stream._buffered)
    stream._write(memoryview(data), 0)
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_write_reading_the_flag_mid_fallback_is_not_refused(tmp_path, monkeypatch,
                                                              direct_stream):
    """The other interleaving: one writer reads the direct flag while the other is switching
    the file to the page cache. The flag may read False only once O_DIRECT is off (flag
    first, then fcntl, failed test_einval_under_o_direct_falls_back_to_the_page_cache in a
    clean-clone CI run, 2026-12-01)."""
    fd, stream = direct_stream
    data = random.Random(3).randbytes(directio.ALIGN)
    real_set = directio._set_direct
    switching = []

    def set_direct(fd_, on):
        if not on and not switching:  # the first fallback, before its fcntl
            switching.append(fd_)
            stream._write(memoryview(data), 0)  # the other writer, right now
        real_set(fd_, on)

    _refuse_under_direct(monkeypatch)
    monkeypatch.setattr(directio, "_set_direct", set_direct)
    stream._buffered()  # this writer's fallback
    assert switching and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    assert (tmp_path / "out.bin").read_bytes() == data


def test_writer_thread_error_is_raised_and_threads_stop(tmp_path, small_buffers, monkeypatch):
    calls = []
    real = os.pwrite

    def full_disk(fd, data, offset):
        calls.append(offset)
        if offset >= 2 * SMALL:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    before = threading.active_count()
    with pytest.raises(OSError) as e:
        _stream_file(tmp_path / "out.bin", [bytes(20 * SMALL)], b"")
    assert e.value.errno == errno.ENOSPC
    assert threading.active_count() == before  # close() joined the hash and write threads
    assert len(calls) < 20  # stopped early: queued buffers were dropped, not written


def test_no_o_direct_means_the_kernel_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(hashcopy, "try_direct", lambda fd: False)
    with hashcopy.output_file(tmp_path / "x") as w:
        assert w._direct is None and w._kernel
        w.write(b"abc")


@pytest.mark.parametrize("base", ["native", "sharded", "torch_dist"])
def test_many_buffers_write_what_the_user_copy_writes(tmp_path, base, small_buffers,
                                                      monkeypatch):
    """enable + disable through many staging buffers (odd 4099-byte reads: buffers end inside
    elements and inside reads), byte for byte and manifest digest for digest against the
    user-space copy, and each manifest digest is the file's."""
    monkeypatch.setattr(hashcopy, "CHUNK", 4096 + 3)
    writes = _journal(monkeypatch)
    src = _build(base, tmp_path / "src")
    trees = {}
    for mode in ("user", "direct"):
        on, off = tmp_path / f"on-{mode}", tmp_path / f"off-{mode}"
        engine.enable(src, on, hooks=Hooks(copy_mode=mode))
        engine.disable(on, off, hooks=Hooks(copy_mode=mode))
        for out in (on, off):
            files = json.loads((out / "mhc-manifest.json").read_text())["files"]
            for rel, rec in files.items():
                if rec.get("sha256"):
                    assert rec["sha256"] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
        trees[mode] = (_digests(on), _digests(off))
    assert trees["user"] == trees["direct"]
    assert sum(d for _, _, d in writes) > 10


def test_real_enospc_on_a_direct_write(dist, tmp_path, small_buffers, monkeypatch):
    """A tmpfs that fills up under a direct write (on a writer thread; the size of
    test_faults' mid-write case): exit 5, one line, nothing left."""
    writes = _journal(monkeypatch)
    sha = tree_sha(dist)
    with tmpfs(tmp_path / "mid", "size=2700k") as mnt:
        code, errors, out = convert(dist, mnt / "out")
        msg = assert_failed_cleanly(dist, sha, mnt / "out", code, errors, out)
        assert "ENOSPC" in msg and "need 2453095 bytes" in msg, msg
        assert list(mnt.iterdir()) == []
    assert any(d for _, _, d in writes), "tmpfs took no direct write: nothing was tested"


def test_staging_buffers_are_reused_by_the_next_file(tmp_path, small_buffers):
    """Old contents of a reused buffer never reach the next file (``_POOL``)."""
    first = random.Random(2).randbytes(3 * SMALL + 7)
    _stream_file(tmp_path / "a.bin", [first[:1], first[1:]], b"")
    pooled = {id(b) for b in directio._POOL}
    assert pooled
    second = b"z" * (SMALL + 3)
    with hashcopy.output_file(tmp_path / "b.bin") as w:
        w.write(second)
        assert id(w._direct._bufs[0]) in pooled
    assert (tmp_path / "b.bin").read_bytes() == second
