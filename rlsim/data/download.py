"""Downloading GroupLens archives with checksum checks."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from rlsim.errors import DataError


def md5_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch_text(url: str, timeout: float = 30.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"could not download {url}: {exc}") from None


def download_file(url: str, dest: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Stream url to dest atomically (a partial download never looks complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                      disable=not progress, leave=False) as bar:
                for block in iter(lambda: resp.read(1 << 16), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {exc}") from None
    tmp.replace(dest)
    return dest


def download_and_extract(
    url: str,
    md5: str | None,
    dest_dir: Path,
    folder: str,
    md5_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Download a zip, verify its md5 (given, or read from the provider's .md5 sidecar), unzip.

    Returns dest_dir/folder. A checksum mismatch deletes the archive and raises DataError.
    """
    dest_dir = Path(dest_dir)
    archive = dest_dir / Path(url).name
    if not archive.exists():
        download_file(url, archive, progress=progress)
    expected = md5
    if expected is None and md5_url:
        text = fetch_text(md5_url).strip()
        expected = next((tok for tok in text.replace("=", " ").split() if len(tok) == 32), None)
        if expected is None:
            raise DataError(f"no md5 found in {md5_url}")
    if expected is not None:
        got = md5_file(archive)
        if got != expected.lower():
            archive.unlink(missing_ok=True)
            raise DataError(
                f"checksum mismatch for {archive.name}: expected md5 {expected}, got {got} (archive deleted)"
            )
    try:
        with zipfile.ZipFile(archive) as zf:
            with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
                zf.extractall(tmp)
                src = Path(tmp) / folder
                if not src.is_dir():
                    raise DataError(f"{archive.name} has no folder '{folder}'")
                target = dest_dir / folder
                if target.exists():
                    shutil.rmtree(target)
                shutil.move(str(src), str(target))
    except zipfile.BadZipFile:
        archive.unlink(missing_ok=True)
        raise DataError(f"{archive.name} is not a valid zip archive (deleted)") from None
    return dest_dir / folder
