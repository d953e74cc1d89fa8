"""Chains in the object store: published by one host, pulled into a verified local cache by others. Torch-free.

With a ``file://`` store (the default) the chains folder *is* the store and every function here
reads it as ``cbd.core.manifest`` does. With an ``s3://`` store:

- ``push_chain`` uploads ``chains/<name>/...`` (anchors, tokenizer, batches), then ``files.json``
  (each file's size and sha256), then ``manifest.json`` **last**: a chain is in the bucket once
  its manifest is, never half of one;
- ``list_chains`` / ``load_manifest`` read the manifests in the bucket (the API host holds no chain);
- ``ensure_local`` (a worker, before it runs a plan) downloads a chain whose local manifest differs
  from the bucket's into a staging folder, checks every file's sha256 against ``files.json`` (and
  each anchor's ``model.safetensors`` against the manifest), and renames it into place with its
  manifest; anchors are then read lazily per tensor from local disk, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from cbd.core import manifest as mf
from cbd.core import objstore
from cbd.core.files import atomic_write_bytes, publish_dir, sha256_file
from cbd.core.names import check_name
from cbd.errors import ChainNotBuiltError, IntegrityError

MANIFEST, FILES = "manifest.json", "files.json"


def _key(name: str, rel: str = MANIFEST) -> str:
    return f"chains/{check_name(name, 'chain name')}/{rel}"


def _bucket() -> objstore.S3Store | None:
    store = objstore.get_store()
    return store if store.remote else None


def list_chains() -> list[str]:
    """Built chains: those whose manifest is in the store."""
    if (store := _bucket()) is None:
        return mf.list_chains()
    names = {o.key.split("/")[1] for o in store.list("chains/") if o.key.count("/") == 2 and o.key.endswith("/" + MANIFEST)}
    return sorted(names)


def load_manifest(name: str) -> mf.ChainManifest:
    """The manifest of a chain in the store (ChainNotBuiltError when it has none)."""
    if (store := _bucket()) is None:
        return mf.load_manifest(name)
    data = store.get_bytes(_key(name))
    if data is None:
        raise ChainNotBuiltError(f"chain {name!r} is not in the store {store.describe()}; build it and "
                                 f"`cbd chain push {name}`", allowed=list_chains())
    try:
        return mf.ChainManifest.model_validate_json(data)
    except ValueError as exc:
        raise IntegrityError(f"chain manifest {_key(name)} in {store.url} is corrupt: {exc}") from None


def _local_files(folder: Path) -> dict[str, dict]:
    """Every file of a local chain folder but its manifest (and work or staging folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel in (MANIFEST, FILES) or any(part.startswith(".") for part in rel.split("/")):
            continue
        out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def push_chain(name: str, root: Path | None = None) -> dict:
    """Upload a locally built chain: its files, ``files.json``, then ``manifest.json`` last.

    Files the bucket already holds with the same size and sha256 (per its ``files.json``) are skipped.
    Returns ``{"chain", "uploaded", "skipped", "bytes"}``."""
    store = _bucket()
    if store is None:
        raise ChainNotBuiltError("CBD_STORE_URL is a folder (or unset): the chains folder is the store, nothing to push",
                                 allowed=["s3://bucket/prefix"])
    folder = mf.chain_dir(name, root)
    manifest = mf.load_manifest(name, root)  # the chain is built here
    files = _local_files(folder)
    for entry in manifest.anchors:
        got = files.get(f"{entry.name}/model.safetensors")
        if got is None or got["sha256"] != entry.sha256:
            raise IntegrityError(f"anchor {entry.name} of chain {name} does not match its manifest; rebuild it")
    old = store.get_bytes(_key(name, FILES))
    remote = json.loads(old) if old else {}
    uploaded = skipped = size = 0
    for rel, f in files.items():
        if remote.get(rel) == f and store.size(_key(name, rel)) == f["size"]:
            skipped += 1
            continue
        store.put_file(_key(name, rel), folder / rel)
        uploaded, size = uploaded + 1, size + f["size"]
    store.put_bytes(_key(name, FILES), json.dumps(files, indent=2, sort_keys=True).encode())
    store.put_bytes(_key(name), (folder / MANIFEST).read_bytes())  # last: the chain is published
    return {"chain": name, "uploaded": uploaded, "skipped": skipped, "bytes": size}


def ensure_local(name: str, want_sha256: str | None = None) -> mf.ChainManifest:
    """The chain in this host's cache, pulled from the store first when it is missing or differs.

    ``want_sha256``: the manifest a plan was made against (no store access when the cache has it)."""
    if _bucket() is None:
        return mf.load_manifest(name)
    local = None
    with contextlib.suppress(ChainNotBuiltError, IntegrityError):
        local = mf.load_manifest(name)
    if local is not None and want_sha256 is not None and local.sha256 == want_sha256:
        return local
    remote = load_manifest(name)
    if local is not None and local.sha256 == remote.sha256:
        return local
    return pull_chain(name)


def pull_chain(name: str) -> mf.ChainManifest:
    """Download the store's chain into this host's cache, verified, the manifest written last."""
    store = _bucket()
    if store is None:
        return mf.load_manifest(name)
    data = store.get_bytes(_key(name))
    listing = store.get_bytes(_key(name, FILES))
    if data is None or listing is None:
        raise ChainNotBuiltError(f"chain {name!r} is not in the store {store.describe()}", allowed=list_chains())
    manifest = mf.ChainManifest.model_validate_json(data)
    files: dict[str, dict] = json.loads(listing)
    final = mf.chain_dir(name)
    tmp = final.with_name(f".pull-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, f in files.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            local = final / rel
            if local.is_file() and local.stat().st_size == f["size"] and sha256_file(local) == f["sha256"]:
                shutil.copy2(local, dest)  # unchanged since the last pull
                continue
            with open(dest, "wb") as out:
                for block in store.stream(_key(name, rel)):
                    out.write(block)
            if sha256_file(dest) != f["sha256"]:
                raise IntegrityError(f"{_key(name, rel)} in {store.url} does not match its sha256 in files.json")
        for entry in manifest.anchors:
            if files.get(f"{entry.name}/model.safetensors", {}).get("sha256") != entry.sha256:
                raise IntegrityError(f"anchor {entry.name} of chain {name} in the store does not match its manifest")
        atomic_write_bytes(tmp / FILES, listing)
        atomic_write_bytes(tmp / MANIFEST, data)
        final.parent.mkdir(parents=True, exist_ok=True)
        publish_dir(tmp, final, replace=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return mf.load_manifest(name)

