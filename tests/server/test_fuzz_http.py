"""Schema fuzzing: schemathesis, driven by the daemon's own /openapi.json, against a live
daemon on loopback (a daemon of its own: the fuzzer registers and deletes things), with
a valid key and without one, every phase on (examples, coverage, fuzzing, stateful).

What must hold: no 5xx; every status code, content type, header and body as the OpenAPI
document says (so every error in OpenAI's shape, `ErrorResponse`); data that breaks the
schema refused; resources gone after a delete. schemathesis.toml, beside this file, leaves
two checks out where they do not apply, each with its reason.

`make test` runs a short deterministic run (--fuzz-examples, default 10 per operation and
phase, fixed seed); `make fuzz` runs a long one.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemons import ALICE

ST = Path(sys.executable).with_name("st")
CONFIG = Path(__file__).with_name("schemathesis.toml")
pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def daemon(own_daemon):
    return own_daemon


@pytest.mark.parametrize("key", [ALICE, None], ids=["with-a-key", "without-a-key"])
def test_the_api_holds_to_its_schema_under_fuzzing(daemon, key, tmp_path, request):
    examples = request.config.getoption("--fuzz-examples")
    command = [str(ST), "--config-file", str(CONFIG), "run", f"{daemon.url}/openapi.json",
               "--max-examples", str(examples), "--seed", "1", "--workers", "1", "--no-color",
               "--report", "junit", "--report-dir", str(tmp_path)]
    if key is not None:
        command += ["--header", f"Authorization: {key}"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                         timeout=3600)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "Server error" not in run.stdout
    assert daemon.health()["status"] == "ok"
