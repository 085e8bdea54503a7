"""What a new user sees while installing: the package metadata builds without setuptools warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_metadata_builds_with_warnings_as_errors(tmp_path):
    # A table-form `project.license` makes setuptools print a deprecation block on every install.
    code = ("import setuptools.build_meta as b, sys; "
            f"print(b.prepare_metadata_for_build_wheel({str(tmp_path)!r}))")
    r = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = next(tmp_path.glob("*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in meta.read_text()
