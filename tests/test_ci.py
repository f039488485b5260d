"""CI cannot be green without the browser test: under CI=true a missing chromium fails it instead of skipping it, and
.ci/run stops when chromium cannot be installed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _browser_test_without_chromium(ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": ci, "PATH": str(Path(sys.executable).parent)}    # no chromium on this PATH
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           str(ROOT / "tests" / "test_app_browser.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_chromium_fails_the_browser_test_under_ci():
    run = _browser_test_without_chromium("true")
    assert run.returncode != 0, run.stdout
    assert "CI=true but chromium is not on PATH" in run.stdout


def test_missing_chromium_skips_the_browser_test_outside_ci():
    run = _browser_test_without_chromium("")
    assert run.returncode in (0, 5), run.stdout          # 5: pytest collected nothing (module skipped)
    assert "skipped" in run.stdout and "chromium is not on PATH" in run.stdout


def test_ci_script_sets_ci_and_fails_when_chromium_cannot_be_installed():
    script = (ROOT / ".ci" / "run").read_text()
    assert "export CI=true" in script
    install = script[script.index("if ! command -v chromium"):script.index("# --- README test command")]
    assert "exit 1" in install and "skipped" not in install
