"""Issue 13: the OpenAPI document tells the truth. schemathesis drives the live test server over every operation,
positive and negative data, with every check (``schemathesis.toml`` lists the one allowance: a schema-valid request
may still meet a route's documented 400 rules), a fixed seed and a bounded number of examples."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_key, make_user

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = Path(__file__).resolve().parents[2]
SEED, EXAMPLES = 1, 20


def test_every_operation_conforms_to_the_published_document(live_server, capsys, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed (make .venv/.installed-dev installs it)")
    root = make_user("root", password="root-password-1", is_superuser=True, is_staff=True)
    key = make_key(root)
    command = [st, "--config-file", str(ROOT / "schemathesis.toml"), "run", f"{live_server.url}/api/schema/"]
    command += ["--header", f"x-api-key: {key}", "--checks", "all"]
    command += ["--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "2", "--no-color"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)  # its cache: there
    summary = [line for line in result.stdout.splitlines() if re.search(r"\d+ generated", line)]
    with capsys.disabled():  # the count of cases and failures goes into the CI log
        print(f"\nschemathesis (seed {SEED}, {EXAMPLES} examples per operation): {' '.join(summary).strip()}")
    assert result.returncode == 0, result.stdout[-6000:]
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", summary[-1]).groups())
    assert generated >= 1000 and passed == generated
