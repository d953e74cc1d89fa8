"""Any fast tokenizer saved as ``PreTrainedTokenizerFast``: the class transformers 4.x and 5.x both read."""

from __future__ import annotations

import json
from pathlib import Path

from cbd.core.files import write_json

FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # a class name transformers 4.x and 5.x both know


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
    write_json(config_path, {**config, "tokenizer_class": FAST_TOKENIZER_CLASS})
