"""``hashcopy.output_file`` keeps its promise on its own: a file it hands back is fsynced while
still open and not written afterwards (the commit's tree fsync is a second line, not a reason
for this one to be absent: the torch_dist and native writers call it for every output file)."""

from __future__ import annotations

import os

from mhc_convert import hashcopy


def test_output_file_fsyncs_before_close(tmp_path, monkeypatch):
    synced: list[tuple[int, int]] = []  # (inode, size) at each fsync
    real_fsync = os.fsync

    def journal(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_ino, st.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", journal)
    path = tmp_path / "a.bin"
    with hashcopy.output_file(path) as w:
        w.write(b"x" * 1000, chunk_phase=False)
        w.write(b"y" * 24, chunk_phase=False)
        assert not synced  # not before the data is all there
    st = path.stat()
    assert (st.st_ino, st.st_size) in synced and st.st_size == 1024
    hashcopy.write_file(tmp_path / "b.json", b"{}")
    assert (os.stat(tmp_path / "b.json").st_ino, 2) in synced
