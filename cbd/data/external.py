"""Corpora of one's own: local files, JSONL, Parquet, a ``datasets`` dataset (forms: cbd.core.sources).

Each is read once into the same corpus folder the packaged corpora have (``train.jsonl``,
``heldout.jsonl``, ``source.json`` under ``$CBD_ASSETS/corpora/<kind>-<key>``), so tokenising,
caching and batching are the packaged corpora's (``cbd.data.batches.token_file``). The key hashes
the spec and, for local files, every file's path, size and modification time: changed files are
read again.

The held-out split takes **whole documents**: documents in the order of the sha256 of their text
(so the split does not depend on file order) are held out until they hold ``HELDOUT_FRACTION`` of
the corpus' characters or ``HELDOUT_MAX_CHARS``, whichever is smaller, and at least one document;
the rest is training text. A corpus needs at least two non-empty documents.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
from pathlib import Path

from cbd.core.files import write_json
from cbd.core.paths import assets_dir
from cbd.core.sources import CorpusRef, parse_corpus
from cbd.errors import AssetUnavailableError, RecipeError

HELDOUT_FRACTION = 0.05
HELDOUT_MAX_CHARS = 2_000_000  # ~0.5M tokens: plenty for the eval batches, cheap to tokenise


def _files(ref: CorpusRef, spec: str) -> list[Path]:
    found = sorted(Path(p) for p in globlib.glob(str(Path(ref.target).expanduser()), recursive=True))
    found = [p for p in found if p.is_file()]
    if not found:
        raise RecipeError(f"corpus {spec!r}: no file matches {ref.target!r}")
    return found


def _key(ref: CorpusRef, spec: str) -> str:
    h = hashlib.sha256(spec.encode())
    if ref.kind != "hf-dataset":
        for p in _files(ref, spec):
            st = p.stat()
            h.update(f"\0{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return f"{ref.kind}-{h.hexdigest()[:16]}"


def _documents(ref: CorpusRef, spec: str) -> list[tuple[str, str]]:
    """(title, text) of every non-empty document, in file and line order."""
    docs: list[tuple[str, str]] = []
    if ref.kind == "files":
        for p in _files(ref, spec):
            docs.append((str(p), p.read_text("utf-8", errors="replace").strip()))
    elif ref.kind == "jsonl":
        for p in _files(ref, spec):
            with p.open(encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        raise RecipeError(f"corpus {spec!r}: {p}:{n} is not JSON ({exc})") from None
                    text = row.get(ref.field) if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        keys = sorted(row)[:8] if isinstance(row, dict) else type(row).__name__
                        raise RecipeError(f"corpus {spec!r}: {p}:{n} has no text field {ref.field!r} (it has {keys})")
                    docs.append((f"{p}:{n}", text.strip()))
    elif ref.kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise AssetUnavailableError(f"corpus {spec!r} needs pyarrow (pip install pyarrow)") from None
        for p in _files(ref, spec):
            schema = pq.read_schema(p)
            if ref.field not in schema.names:
                raise RecipeError(f"corpus {spec!r}: {p} has no column {ref.field!r} (it has {schema.names[:8]})")
            for n, text in enumerate(pq.read_table(p, columns=[ref.field]).column(0).to_pylist()):
                if isinstance(text, str):
                    docs.append((f"{p}#{n}", text.strip()))
    else:
        docs = _dataset_documents(ref, spec)
    return [(t, d) for t, d in docs if d]


def _dataset_documents(ref: CorpusRef, spec: str) -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise AssetUnavailableError(f"corpus {spec!r} needs the `datasets` package (pip install datasets) and its "
                                    "hub reachable") from None
    try:
        ds = datasets.load_dataset(ref.target, split=ref.split)
    except Exception as exc:  # not found, unreachable, no such split: the library's own words
        raise AssetUnavailableError(f"corpus {spec!r}: the dataset cannot be loaded: {type(exc).__name__}: {exc}") from None
    if ref.field not in ds.column_names:
        raise RecipeError(f"corpus {spec!r}: the dataset has no field {ref.field!r} (it has {ds.column_names[:8]})")
    return [(f"{ref.target}:{ref.split}#{n}", t) for n, t in enumerate(ds[ref.field]) if isinstance(t, str)]


def split_documents(docs: list[tuple[str, str]], spec: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, heldout): whole documents held out by the rule of the module docstring, each in input order."""
    if len(docs) < 2:
        raise RecipeError(f"corpus {spec!r} has {len(docs)} non-empty document(s): the held-out split takes whole "
                          "documents, so it needs at least 2 (files: one document per file; jsonl: per line)")
    total = sum(len(d) for _, d in docs)
    budget = min(HELDOUT_FRACTION * total, HELDOUT_MAX_CHARS)
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i][1].encode()).digest())
    held: set[int] = set()
    chars = 0
    for i in order:
        if held and (chars >= budget or chars + len(docs[i][1]) > HELDOUT_MAX_CHARS):
            break
        if len(held) == len(docs) - 1:
            break
        held.add(i)
        chars += len(docs[i][1])
    return ([docs[i] for i in range(len(docs)) if i not in held], [docs[i] for i in range(len(docs)) if i in held])


def external_corpus_dir(spec: str) -> Path:
    """The corpus folder of ``spec`` (not a packaged name), read and split once."""
    from cbd.data.archives import build_once

    try:
        ref = parse_corpus(spec)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None

    def build(tmp: Path) -> None:
        train, heldout = split_documents(_documents(ref, spec), spec)
        tmp.mkdir()
        for split, docs in (("train", train), ("heldout", heldout)):
            with (tmp / f"{split}.jsonl").open("w") as f:
                f.writelines(json.dumps({"title": t, "text": d}) + "\n" for t, d in docs)
        write_json(tmp / "source.json", {
            "spec": spec, "heldout": f"{len(heldout)} whole documents ({sum(len(d) for _, d in heldout):,} "
                                      f"characters; rule: {HELDOUT_FRACTION:.0%} of the text, at most "
                                      f"{HELDOUT_MAX_CHARS:,} characters, at least one document)",
            "documents": {"train": len(train), "heldout": len(heldout)}})

    return build_once(assets_dir() / "corpora" / _key(ref, spec), build)
