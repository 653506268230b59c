"""Fuzz Megatron's tracker file (``latest_checkpointed_iteration.txt``) through
``mhc_model.megatron_files.read_tracker`` and format detection + reading of a run directory
(the real megatron-core 0.19.2 run, whose tracker says ``1000``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fixtures.hostile_sources import TRACKER, copy_megatron
from mhc_convert.adapters import detect
from mhc_model.megatron_files import read_tracker
from tests.fuzz.harness import check, fuzz_settings, mutated

WORK = Path(tempfile.mkdtemp(prefix="mhc-fuzz-tracker-"))
RUN = copy_megatron(WORK)
TRACKER_PATH = RUN / TRACKER
BASE = TRACKER_PATH.read_bytes()


def parse(data: bytes) -> None:
    TRACKER_PATH.write_bytes(data)
    read_tracker(TRACKER_PATH)
    adapter = detect(RUN)
    adapter.config(adapter.read(RUN))


def test_base_reads():
    TRACKER_PATH.write_bytes(BASE)
    assert read_tracker(TRACKER_PATH)[0] == 1000


TEXT = st.one_of(
    st.sampled_from(["1000", "1000\n", " 1000 ", "release", "release\n", "RELEASE", "0",
                     "-1", "+1000", "1_000", "1e3", "١٠٠٠", "1000\x00", "\ufeff1000",
                     "9" * 12, "9" * 13, "9" * 5000, "", "\n", "iter_0001000", "0x3e8"]),
    st.text(alphabet="0123456789 \t\n\r\x0b\x0c\u00a0\u2028release", max_size=16),
    st.text(max_size=16),
).map(lambda s: s.encode("utf-8", "surrogatepass"))


@fuzz_settings(max_examples=150)
@given(TEXT | st.binary(max_size=24) | st.binary(min_size=1020, max_size=1100))
def test_fuzz_tracker_text(data):
    check("tracker/text", parse, data)


@fuzz_settings(max_examples=60)
@given(mutated(BASE, max_ops=3))
def test_fuzz_tracker_bytes(data):
    check("tracker/bytes", parse, data)
