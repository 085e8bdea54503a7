"""What a new user sees while installing: the package metadata builds without setuptools warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_make_test_finds_the_data_like_the_quickstart(tmp_path):
    """`make test` passes the data folder the quickstart reads (DATA_DIR, default ../shared/datasets) to
    the tests as RLSIM_DATA_DIR, so the real-data tests run instead of skipping; without it, nothing."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    data = tmp_path / "datasets"
    (data / "ml-100k").mkdir(parents=True)
    (data / "ml-100k" / "u.data").write_text("1\t1\t5\t0\n")
    for target in ("test", "test-all"):
        # -o: take .venv as built, so -n only prints the test command.
        out = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", "install", target,
                              f"DATA_DIR={data}", "RLSIM_DATA_DIR="],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert f"RLSIM_DATA_DIR={data} " in out, out
    out = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", "install", "test",
                          f"DATA_DIR={tmp_path / 'none'}", "RLSIM_DATA_DIR="],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "RLSIM_DATA_DIR=" not in out and "pytest" in out, out
