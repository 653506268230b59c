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
