"""``cbd fetch``: the CI client. POST a shape, poll the job, download and verify the files.

    cbd fetch --layers 4 --hidden 256 --heads 4 --kv-heads 2 --ffn 512 --out ./init
    CBD_URL=https://cbd.internal CBD_API_KEY=... cbd fetch --spec shape.json --out ./init

Downloads resume (HTTP Range on a ``.part`` file), every file is checked against the sha256
the service reports, and finished checkpoints are cached by id under ``$CBD_HOME/fetch``: a
second fetch of the same shape downloads nothing. Exit codes (README, "Command line"): 0 done,
2 the service refused the request (4xx: bad input, missing or wrong ``CBD_API_KEY``), 3 the job
failed, or the chain or tokenizer asked for does not exist, 4 a checksum mismatch, 5 the service
is unreachable, answered 5xx, or the job did not finish in ``--timeout`` (one ``cbd.errors.FetchError``
subclass each; ``cbd.cli.main.EXIT``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import typer

from cbd.cli.options import Ffn, Heads, Hidden, KvHeads, Layers, SpecFile, request_from
from cbd.core import paths
from cbd.core.files import sha256_file
from cbd.core.request import InitRequest
from cbd.errors import (
    FetchChecksumError,
    FetchJobFailedError,
    FetchNotFoundError,
    FetchRefusedError,
    FetchUnavailableError,
)

CHUNK = 1 << 20
NOT_FOUND = ("UnknownNameError", "ChainNotBuiltError")  # the service's error names that mean exit 3


def register(app: typer.Typer) -> None:
    app.command("fetch")(fetch_command)


def fetch_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to place the checkpoint in")],
    spec: SpecFile = None, layers: Layers = None, hidden: Hidden = None, heads: Heads = None,
    kv_heads: KvHeads = None, ffn: Ffn = None,
    chain: Annotated[str | None, typer.Option(help="chain name")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16")] = None,
    url: Annotated[str, typer.Option(envvar="CBD_URL", help="service URL")] = "http://127.0.0.1:8000",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the job")] = 3600.0,
) -> None:
    """Fetch an initialisation from a cbd service into OUT (resumable, verified, cached)."""
    req = request_from(spec, layers, hidden, heads, kv_heads, ffn, chain=chain, dtype=dtype)
    folder = fetch(request_body(req), out, url=url, timeout=timeout,
                   api_key=os.environ.get("CBD_API_KEY"), progress=sys.stderr.isatty())
    typer.echo(str(folder))  # a FetchError leaves by cbd.cli.main: its exit code is EXIT's


def request_body(req: InitRequest) -> dict:
    """What ``cbd fetch`` POSTs: the fields the user gave (checked here by the same model the
    service uses), not the defaults, so a newer client talks to an older service as long as it
    asks only for what that service knows (the service fills in its own defaults)."""
    return req.model_dump(mode="json", exclude_unset=True, exclude_none=True)


def fetch(body: dict, out: Path, *, url: str, timeout: float = 3600.0, api_key: str | None = None,
          progress: bool = False, client: httpx.Client | None = None) -> Path:
    headers = {"X-API-Key": api_key} if api_key else {}
    http = client or httpx.Client(base_url=url, headers=headers, timeout=60.0)
    try:
        deadline = time.monotonic() + timeout
        job = _wait(http, _request(http, "POST", "/initialize", json=body), deadline, progress)
        if job.get("kind") == "build_chain":  # the chain was built on demand: ask again
            job = _wait(http, _request(http, "POST", "/initialize", json=body), deadline, progress)
        cached = download(http, job, progress=progress)
    finally:
        if client is None:
            http.close()
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(cached, out)
    return out


def _request(http: httpx.Client, method: str, path: str, **kw) -> dict:
    try:
        r = http.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise FetchUnavailableError(f"cannot reach the service at {http.base_url}: {exc}") from None
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            body = None
        kind = body.get("error") if isinstance(body, dict) else None
        if kind == "JobFailedError":  # the job ran and failed while the request waited (a 5xx or 409)
            cause = body.get("cause") or {}
            raise FetchJobFailedError(f"job {body.get('job_id')} failed: {cause.get('type')}: {cause.get('message')}")
        if kind in NOT_FOUND:
            raise FetchNotFoundError(f"not found ({r.status_code} {kind}): {body.get('message')}")
        if r.status_code >= 500:
            raise FetchUnavailableError(f"the service answered {r.status_code}: {r.text[:300]}")
        raise FetchRefusedError(f"the service refused the request ({r.status_code}): {r.text[:500]}")
    return r.json()


def _wait(http: httpx.Client, job: dict, deadline: float, progress: bool) -> dict:
    """Poll ``/jobs/{id}`` until the job finishes; a failed job raises with its clean error."""
    while job["status"] != "finished":
        if job["status"] in ("failed", "cancelled"):  # cancelled: DELETE /jobs/{id} by its owner or an operator
            err = job.get("error") or {}
            raise FetchJobFailedError(f"job {job['id']} {job['status']}: {err.get('type')}: {err.get('message')}")
        if time.monotonic() > deadline:
            raise FetchUnavailableError(f"job {job['id']} did not finish in time (--timeout)")
        if progress and job.get("progress"):
            p = job["progress"]
            typer.echo(f"\r{p.get('stage', '')} {100 * p.get('fraction', 0):.0f}%   ", err=True, nl=False)
        time.sleep(1.0)
        job = _request(http, "GET", f"/jobs/{job['id']}")
    return job


def download(http: httpx.Client, job: dict, *, progress: bool = False) -> Path:
    """Every file of a finished job into the cache folder of its artifact id, verified."""
    aid = job.get("artifact_id") or job["id"]
    folder = paths.home() / "fetch" / aid
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, f in sorted(job["files"].items()):
        _download_file(http, f["url"], folder / name, f["size"], f["sha256"], progress)
    (folder / ".complete").write_text(json.dumps({n: f["sha256"] for n, f in job["files"].items()}))
    return folder


@contextlib.contextmanager
def _stream(http: httpx.Client, url: str, headers: dict) -> Iterator[httpx.Response]:
    """GET ``url``; a redirect (a service that hands out presigned URLs of its object store) is followed
    without the client's own headers (its X-API-Key stays with the service), the Range kept."""
    with http.stream("GET", url, headers=headers, timeout=300.0) as r:
        if not r.is_redirect:
            yield r
            return
        location = str(r.url.join(r.headers["location"]))
    with httpx.stream("GET", location, headers=headers, timeout=300.0, follow_redirects=True) as r:
        yield r


def _download_file(http: httpx.Client, url: str, dest: Path, size: int, sha256: str, progress: bool) -> None:
    if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == sha256:
        return
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with _stream(http, url, headers) as r:
            if r.status_code == 416 and have == size:
                pass
            elif r.status_code not in (200, 206):
                raise FetchUnavailableError(f"download of {dest.name} answered {r.status_code}")
            else:
                mode = "ab" if r.status_code == 206 else "wb"
                with open(part, mode) as fh:
                    for chunk in r.iter_bytes(CHUNK):
                        fh.write(chunk)
                        if progress:
                            typer.echo(f"\r{dest.name}: {fh.tell() / 1e6:.1f}/{size / 1e6:.1f} MB", err=True, nl=False)
    except httpx.HTTPError as exc:
        raise FetchUnavailableError(f"download of {dest.name} broke off ({exc}); run the same command again to "
                                    "resume") from None
    if sha256_file(part) != sha256:
        part.unlink()
        raise FetchChecksumError(f"{dest.name}: sha256 mismatch; the partial file was removed, run again")
    os.replace(part, dest)

