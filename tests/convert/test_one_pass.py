"""The one-pass NaN/Inf check (``validate.OnePassScan`` fed by ``hashcopy.copy_range``) against
its reference (``check_finite`` reading the source before the write, ``finite_scan=
"reference"``): the same output bytes, the same refusals naming the same file and key, every
range really read (or reported linked), and ``--link`` reporting linked bytes as unchanged
source bytes."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from fixtures.hostile_megatron import _tensor_blob
from fixtures.hostile_native import _sharded
from fixtures.hostile_sources import (
    A_LOG,
    DISTCP,
    ITER,
    NORM,
    copy_megatron,
    copy_native,
    td_put_blob,
)
from mhc_convert import directio, engine, hashcopy, validate
from mhc_convert.adapters import adapter_for
from mhc_convert.errors import InvalidInputError, VerificationError
from mhc_convert.formats.torch_dist import read_metadata
from mhc_convert.hooks import Hooks

MODES = {"one-pass": Hooks(copy_mode="user"), "reference": Hooks(finite_scan="reference"),
         "kernel": Hooks(copy_mode="kernel"), "direct": Hooks(copy_mode="direct")}


def _build(base: str, d: Path) -> Path:
    return {"native": copy_native, "sharded": lambda p: _sharded(p)[0],
            "torch_dist": copy_megatron}[base](d)


def _digests(out: Path) -> dict[str, str]:
    """sha256 of every output file; DCP's ``.metadata`` with its fresh ``save_id`` (a uuid4
    per save) blanked, and our manifest (timestamps, pid) left out."""
    got = {}
    for p in sorted(q for q in out.rglob("*") if q.is_file()):
        data = p.read_bytes()
        if p.name == ".metadata":
            save_id = read_metadata(p.parent).storage_meta.save_id
            data = data.replace(save_id.encode(), b"-" * len(save_id))
        if p.name != "mhc-manifest.json":
            got[p.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return got


@pytest.mark.parametrize("base", ["native", "sharded", "torch_dist"])
def test_one_pass_writes_what_the_reference_writes(tmp_path, base, monkeypatch):
    """enable and disable, every mode, byte for byte; with a 4 KiB + 3 byte copy chunk so
    buffers end inside elements and the scan's carry-over is exercised; direct mode with
    8 KiB staging buffers, so reads end at buffer ends too."""
    monkeypatch.setattr(hashcopy, "CHUNK", CHUNK)
    monkeypatch.setattr(directio, "BUF", 2 * directio.ALIGN)
    src = _build(base, tmp_path / "src")
    trees = {}
    for name, hooks in MODES.items():
        on, off = tmp_path / f"on-{name}", tmp_path / f"off-{name}"
        engine.enable(src, on, hooks=hooks)
        engine.disable(on, off, hooks=hooks)
        trees[name] = (_digests(on), _digests(off))
    assert trees["one-pass"] == trees["reference"] == trees["kernel"] == trees["direct"]


CHUNK = 4096 + 3  # odd: 2-byte elements straddle copy buffers (element 2049 the first one)


def _spread(t: torch.Tensor, value: float, n: int) -> tuple[torch.Tensor, int]:
    """A copy of ``t`` with ``value`` at ``n`` elements spread from the first to the last, and
    at element 2049 (which straddles two CHUNK buffers) if ``t`` has one; and that count."""
    t = t.clone()
    flat = t.view(-1)
    at = {i * (flat.numel() - 1) // max(1, n - 1) for i in range(n)}
    at |= {2049} if flat.numel() > 2049 and t.element_size() == 2 else set()
    flat[sorted(at)] = value
    return t, len(at)


def _reads(monkeypatch) -> list[str]:
    """Keys the reference scan (``check_finite``) is asked to read before the write."""
    seen: list[str] = []
    real = engine.check_finite

    def spy(view, keys, **kw):
        keys = list(keys)
        seen.extend(keys)
        return real(view, keys, **kw)

    monkeypatch.setattr(engine, "check_finite", spy)
    return seen


def _largest(view, dtype: str) -> str:
    return max((e for e in view.entries.values() if e.dtype == dtype), key=lambda e: e.nbytes).key


@pytest.mark.parametrize("base,key,value,n", [
    ("native", None, float("nan"), 3),
    ("sharded", NORM, float("-inf"), 2),
    ("torch_dist", None, float("nan"), 5),
    ("torch_dist", f"optimizer.state.exp_avg.{A_LOG}", float("inf"), 2),
])
@pytest.mark.parametrize("mode", ["one-pass", "kernel", "direct"])
def test_nonfinite_refused_mid_copy_at_its_key(tmp_path, monkeypatch, base, key, value, n,
                                               mode):
    """The refusal comes from the copy's own read (the key never reaches ``check_finite``),
    names the file and key and the counts the reference reports, and leaves nothing. ``None``:
    the largest bf16 tensor (many buffers, elements split between them)."""
    monkeypatch.setattr(hashcopy, "CHUNK", CHUNK)
    monkeypatch.setattr(directio, "BUF", 2 * directio.ALIGN)
    src = _build(base, tmp_path / "src")
    view = adapter_for("torch_dist" if base == "torch_dist" else "native").read(src)
    key = key or _largest(view, "bfloat16")
    entry = view.entries[key]
    if base == "torch_dist":
        bad, n = _spread(torch.ones(entry.shape, dtype=getattr(torch, entry.dtype)), value, n)
        td_put_blob(src, key, _tensor_blob(bad))
        file = src / ITER / DISTCP
    else:
        from safetensors.torch import load_file, save_file

        file = src / view.meta["shard_of"][key]
        state = load_file(str(file))
        state[key], n = _spread(state[key], value, n)
        save_file(state, str(file), metadata={"format": "pt"})
    assert entry.nbytes > 2 * CHUNK or key in (NORM, f"optimizer.state.exp_avg.{A_LOG}")
    what = "NaN" if math.isnan(value) else "Inf"
    with pytest.raises(InvalidInputError) as ref:
        engine.enable(src, tmp_path / "ref", hooks=MODES["reference"])
    seen = _reads(monkeypatch)
    with pytest.raises(InvalidInputError) as one:
        engine.enable(src, tmp_path / "out", hooks=MODES[mode])
    assert key not in seen  # checked in the copy, not before it
    assert one.value.key == ref.value.key == key
    assert str(one.value.path) == str(ref.value.path) == str(file)
    assert one.value.message == ref.value.message and f"{n} {what}" in one.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temp dir


def test_link_reports_linked_bytes_as_unchanged_source_bytes(tmp_path):
    """``--link hardlink``: the data file is not read; the report says how many tensor bytes
    are the source's own, unchecked; ``--link copy`` of the same source is refused."""
    src = copy_megatron(tmp_path)
    td_put_blob(src, NORM, _tensor_blob(_spread(torch.ones(64, dtype=torch.bfloat16),
                                                float("nan"), 5)[0]))
    view = adapter_for("torch_dist").read(src)
    tensor_bytes = sum(r.length for e in view.entries.values()
                       if e.kind == "tensor" and validate.is_floating(e.dtype)
                       for r in view.stored_ranges(e))
    rep = engine.enable(src, tmp_path / "linked", link="hardlink")
    notes = [n for n in rep.notes if n.startswith("--link hardlink")]
    assert notes == [f"--link hardlink: {tensor_bytes} bytes of tensor data are the source's "
                     f"own bytes, unchanged and not read; the NaN/Inf check covered the bytes "
                     f"written"]
    out_file = tmp_path / "linked" / ITER / DISTCP
    assert out_file.stat().st_ino == (src / ITER / DISTCP).stat().st_ino
    with pytest.raises(InvalidInputError, match="5 NaN"):
        engine.enable(src, tmp_path / "copied", link="copy")


def test_a_range_never_read_fails_the_seal(tmp_path):
    """``finish`` refuses a writer that skipped a range (it would pass as checked)."""
    src = copy_native(tmp_path)
    view = adapter_for("native").read(src)
    keys = [k for k, e in view.entries.items() if validate.is_floating(e.dtype)]
    scan = validate.OnePassScan(view, keys)
    assert not scan.upfront
    entry = view.entries[keys[0]]
    (r,) = view.stored_ranges(entry)
    (part,) = scan.ranges(r.path, r.offset, r.length)
    part.feed(memoryview(bytearray(r.length - 2)))
    with pytest.raises(VerificationError, match=f"read {r.length - 2} of the {r.length}"):
        scan.finish()
    assert scan.ranges(r.path, r.offset, r.length) == []  # claimed once: a second copy skips


def test_chunk_ranges_are_the_bytes_the_reader_streams():
    """``dcp_chunk_range`` (where the copy looks) against ``dcp_chunk_slices`` (zipfile)."""
    from tests.paths import MEGATRON_FIXTURE

    view = adapter_for("torch_dist").read(MEGATRON_FIXTURE)
    n = 0
    for e in view.entries.values():
        if e.kind != "tensor":
            continue
        ranges = view.stored_ranges(e)
        streamed = b"".join(bytes(s.numpy()) for _, sl in view.byte_sources(e) for s in sl)
        direct = b"".join(r.path.read_bytes()[r.offset:r.offset + r.length] for r in ranges)
        assert direct == streamed and len(direct) == e.nbytes, e.key
        n += 1
    assert n > 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.complex64, torch.float8_e5m2, torch.float8_e4m3fn])
def test_bit_tests_match_torch(dtype):
    """``count_bits`` (numpy) against torch's own isnan/isinf on random bits."""
    gen = torch.Generator().manual_seed(1)
    nbytes = 4096 * torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    vals = raw.view(dtype)
    nan, inf = validate.count_bits(raw.numpy(), str(dtype).removeprefix("torch."))
    if dtype.is_complex:
        parts = torch.view_as_real(vals)
        want = int(parts.isnan().sum()), int(parts.isinf().sum())
    else:
        f = vals.float() if vals.element_size() == 1 else vals
        want = int(f.isnan().sum()), int(f.isinf().sum())
    assert (nan, inf) == want and nan + inf > 0


def test_overlapping_ranges_are_checked_up_front(tmp_path):
    """Two keys pointing at one stored record cannot both be fed by one copy: both go to the
    reference scan, before the write; the others stay in the copy."""
    src = copy_megatron(tmp_path)
    view = adapter_for("torch_dist").read(src)
    a, b, c = [k for k, e in view.entries.items() if e.dtype == "bfloat16"][:3]
    ra = view.stored_ranges(view.entries[a])
    real = view.ranges
    view.ranges = lambda e: ra if e.key in (a, b) else real(e)
    scan = validate.OnePassScan(view, [a, b, c])
    assert sorted(scan.upfront) == sorted([a, b])
    (rc,) = view.stored_ranges(view.entries[c])
    assert [r.key for r in scan.ranges(rc.path, rc.offset, rc.length)] == [c]
