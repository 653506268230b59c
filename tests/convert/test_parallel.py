"""Shards written side by side (``parallel.run_jobs`` under ``write_native``): the same bytes
and manifest digests as one at a time; a failure in one file stops the others at their next
chunk and is raised only once every file has stopped (so the cleanup never races a writer);
Ctrl-C in the calling thread does the same; phase hooks make it one file at a time."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from mhc_convert import directio, engine, hashcopy, parallel
from mhc_convert.errors import InvalidInputError
from mhc_convert.hooks import Hooks
from tests.convert.test_one_pass import _build, _digests


def _looper(log: list[str], name: str, fail_after: int | None = None):
    """A job that 'copies' chunks (``check_cancelled`` per chunk, as hashcopy does)."""
    def job() -> None:
        try:
            for i in range(2000):
                if fail_after is not None and i == fail_after:
                    raise OSError(28, "No space left on device")
                time.sleep(0.001)
                parallel.check_cancelled()
            log.append(f"{name} done")
        except parallel.Cancelled:
            log.append(f"{name} cancelled")
            raise
    return job


def test_first_failure_stops_the_others_and_is_raised_after_they_end():
    log: list[str] = []
    jobs = [_looper(log, "a"), _looper(log, "b", fail_after=5), _looper(log, "c")]
    with pytest.raises(OSError, match="No space"):
        parallel.run_jobs(jobs, width=2)
    # a stopped at its next chunk; c (started on b's freed worker, or not at all) likewise
    assert "a cancelled" in log and set(log) <= {"a cancelled", "c cancelled"}
    assert not any(t.name.startswith("mhc-file") for t in threading.enumerate())


def test_ctrl_c_in_the_calling_thread_cancels_the_jobs():
    log: list[str] = []
    main = threading.main_thread().ident
    threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        parallel.run_jobs([_looper(log, "a"), _looper(log, "b")], width=2)
    assert sorted(log) == ["a cancelled", "b cancelled"]


def test_width_one_runs_in_order_in_this_thread():
    seen = []
    parallel.run_jobs([lambda i=i: seen.append((i, threading.current_thread().name))
                       for i in range(3)], width=1)
    assert seen == [(i, threading.main_thread().name) for i in range(3)]
    assert Hooks(file_writers=3, crash_at="mid-copy:9").writers == 1
    assert Hooks(file_writers=3).writers == 3
    assert Hooks.from_env({"MHC_FILE_WRITERS": "1"}).writers == 1


def _manifest_digests(out):
    files = json.loads((out / "mhc-manifest.json").read_text())["files"]
    return {k: v["sha256"] for k, v in files.items()}


def test_side_by_side_writes_what_one_at_a_time_writes(tmp_path, monkeypatch):
    """The 2-shard fixture through 8 KiB staging buffers and odd reads, enable and disable,
    with 1 and 2 writers: every byte and every manifest digest equal."""
    monkeypatch.setattr(hashcopy, "CHUNK", 4096 + 3)
    monkeypatch.setattr(directio, "BUF", 2 * directio.ALIGN)
    started = []
    real = parallel.run_jobs
    monkeypatch.setattr("mhc_convert.formats.native.run_jobs",
                        lambda jobs, width: (started.append((len(jobs), width)),
                                             real(jobs, width=width)))
    src = _build("sharded", tmp_path / "src")
    got = {}
    for w in (1, 2):
        on, off = tmp_path / f"on-{w}", tmp_path / f"off-{w}"
        engine.enable(src, on, hooks=Hooks(file_writers=w))
        engine.disable(on, off, hooks=Hooks(file_writers=w))
        got[w] = (_digests(on), _digests(off), _manifest_digests(on), _manifest_digests(off))
    assert got[1] == got[2]
    assert (2, 2) in started and (2, 1) in started  # both shards, side by side and not


def test_nonfinite_in_one_shard_while_the_other_is_written(tmp_path, monkeypatch):
    """The refusal from the shard being checked names its file and key; nothing is left."""
    from safetensors.torch import load_file, save_file

    from mhc_convert.adapters import adapter_for

    monkeypatch.setattr(directio, "BUF", 2 * directio.ALIGN)
    src = _build("sharded", tmp_path / "src")
    view = adapter_for("native").read(src)
    shard = sorted(set(view.meta["shard_of"].values()))[1]
    key = max((k for k, f in view.meta["shard_of"].items() if f == shard),
              key=lambda k: view.entries[k].nbytes)
    state = load_file(str(src / shard))
    state[key].view(-1)[-1] = float("nan")
    save_file(state, str(src / shard), metadata={"format": "pt"})
    with pytest.raises(InvalidInputError) as e:
        engine.enable(src, tmp_path / "out", hooks=Hooks(file_writers=2))
    assert e.value.key == key and str(e.value.path) == str(src / shard)
    assert "1 NaN" in e.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
