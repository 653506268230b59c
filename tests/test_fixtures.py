"""The shipped fixtures are exactly what fixtures/make_fixtures.py generates."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fixtures_match_checksums():
    res = subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_fixtures.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_external_megatron_fixture_is_pristine():
    import hashlib

    base = ROOT / "fixtures" / "external"
    for line in (base / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((base / name).read_bytes()).hexdigest() == digest, name


def _sha256sums():
    sys.path.insert(0, str(ROOT / "fixtures"))
    import sha256sums

    return sha256sums


def test_the_sums_writer_reproduces_every_committed_tree_sums_file(tmp_path):
    """fixtures/sha256sums.refresh, as report.write_sums / make_optim._sums and
    tilekernels/make.py call it, writes each committed SHA256SUMS byte for byte."""
    S = _sha256sums()
    ext = ROOT / "fixtures" / "external"
    tk = next(ext.glob("tilekernels-*"))
    # (sums file, its base, the tree whose files are rewritten, the lines that tree owns)
    cases = [(b / "SHA256SUMS", b, b, lambda rel: True) for b in sorted(ext.glob("megatron-*-*"))
             if (b / "SHA256SUMS").exists()]
    cases.append((ext / "SHA256SUMS", ext, tk, lambda rel, p=tk.name + "/": rel.startswith(p)))
    assert len(cases) >= 3
    for i, (sums, base, tree, owns) in enumerate(cases):
        out = tmp_path / f"{i}.sums"
        out.write_bytes(sums.read_bytes())
        files = [p for p in tree.rglob("*") if p.is_file() and p.name != "SHA256SUMS"]
        S.refresh(out, base, files, owns)
        assert out.read_bytes() == sums.read_bytes(), sums


def test_the_sums_writer_replaces_only_the_lines_it_owns(tmp_path):
    S = _sha256sums()
    (tmp_path / "optim_a").mkdir()
    (tmp_path / "optim_a" / "x.bin").write_bytes(b"new")
    (tmp_path / "b.txt").write_bytes(b"b")
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'0' * 64}  optim_a/gone.bin\n{'1' * 64}  b.txt\n")
    S.refresh(sums, tmp_path, [tmp_path / "optim_a" / "x.bin"],
              owns=lambda rel: rel.startswith("optim_"))
    assert sums.read_text() == (f"{'1' * 64}  b.txt\n"
                                f"{S.sha256(tmp_path / 'optim_a' / 'x.bin')}  optim_a/x.bin\n")
