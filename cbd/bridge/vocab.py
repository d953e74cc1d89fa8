"""Vocabulary transfer: token bytes, the map between two vocabularies, FVT."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cbd.core.spec import ModelSpec, make_spec
from cbd.shape import arch

SPECIAL_ROLES = ("eos", "bos", "pad", "unk")  # precedence when one id has several roles


BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# ---- vocabulary transfer (pure) -------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable stand-in of each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_json(tok) -> dict:
    dec = tok.backend_tokenizer.decoder
    return json.loads(dec.__getstate__()) if dec is not None else {}


def is_byte_level(tok) -> bool:
    """True when the tokenizer's pieces are GPT-2 byte-level strings (GPT-2, SmolLM2, Llama 3)."""
    d = _decoder_json(tok)
    return d.get("type") == "ByteLevel" or any(x.get("type") == "ByteLevel" for x in d.get("decoders", []))


def token_bytes(tok) -> list[bytes | None]:
    """The raw bytes each id stands for; None for special tokens (they have no text).

    Byte-level pieces are mapped back through GPT-2's byte alphabet (``"Ġthe"`` -> ``b" the"``,
    half a UTF-8 character stays half); SentencePiece pieces go through the tokenizer's own
    decoder (``"▁the"`` -> ``" the"``) and ``<0xHH>`` byte-fallback pieces become that byte.
    """
    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    bd = _byte_decoder() if is_byte_level(tok) else None
    dec = tok.backend_tokenizer.decoder
    out: list[bytes | None] = []
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in added:  # added tokens hold their literal text, not byte-level pieces
            out.append(None if added[i].special else added[i].content.encode())
        elif piece is None:
            out.append(None)
        elif bd is not None and all(c in bd for c in piece):
            out.append(bytes(bd[c] for c in piece))
        elif m := BYTE_FALLBACK.match(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append((dec.decode([piece]) if dec is not None else piece).encode())
    return out


def _special_ids(tok, ids: dict[str, int | None] | None = None) -> dict[str, int]:
    ids = ids if ids is not None else {r: getattr(tok, f"{r}_token_id", None) for r in SPECIAL_ROLES}
    return {r: i for r, i in ids.items() if i is not None}


@dataclass
class VocabMap:
    """Where each target row comes from: FVT pieces, a chain special row, or the mean row."""

    vocab_size: int  # padded
    pieces: list[list[int]]  # per tokenizer id: chain ids (empty: mean row)
    special: dict[int, int]  # target id -> chain id (same role)
    stats: dict[str, int] = field(default_factory=dict)


def vocab_map(target_tok, chain_tok, *, vocab_size: int, chain_special: dict[str, int] | None = None) -> VocabMap:
    """FVT pieces of every target token under the chain tokenizer (the transfer's only text step)."""
    raw = token_bytes(target_tok)
    chain_bl = is_byte_level(chain_tok)
    texts = {i: b.decode() for i, b in enumerate(raw) if b is not None and _utf8(b)}
    pieces: list[list[int]] = [[] for _ in raw]
    if texts:
        enc = chain_tok(list(texts.values()), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for i, ids in zip(texts, enc, strict=True):
            pieces[i] = list(ids)
    enc_bytes = {v: k for k, v in _byte_decoder().items()}
    partial = 0
    for i, b in enumerate(raw):
        if b is None or i in texts:
            continue
        partial += 1  # half a character: byte-level pieces when the chain has them
        if chain_bl:
            pieces[i] = [t.id for t in chain_tok.backend_tokenizer.model.tokenize("".join(enc_bytes[x] for x in b))]
        else:
            pieces[i] = chain_tok(b.decode(errors="replace"), add_special_tokens=False)["input_ids"]
    cs = _special_ids(chain_tok, chain_special)
    special: dict[int, int] = {}
    for role, tid in _special_ids(target_tok).items():
        if role in cs:
            special.setdefault(tid, cs[role])
    stats = {"tokenizer_size": len(raw), "vocab_size": vocab_size, "padding_rows": vocab_size - len(raw),
             "fvt": sum(1 for i, p in enumerate(pieces) if p and i not in special),
             "partial_characters": partial, "special_mapped": len(special),
             "mean_row": sum(1 for i, p in enumerate(pieces) if not p and i not in special),
             "single_piece": sum(1 for i, p in enumerate(pieces) if len(p) == 1 and i not in special)}
    return VocabMap(vocab_size, pieces, special, stats)


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def fvt(chain_rows: Tensor, vmap: VocabMap) -> Tensor:
    """``(V_target, d)`` rows: mean of the chain rows of each token's pieces (FVT).

    Tokens without pieces, unmapped special tokens and the padding rows get the mean chain row
    (a new token then starts as likely as an average one, not as a random direction).
    """
    mean = chain_rows.mean(0)
    out = mean.expand(vmap.vocab_size, -1).clone()
    have = [i for i, p in enumerate(vmap.pieces) if p]
    if have:
        flat = torch.tensor([c for i in have for c in vmap.pieces[i]], dtype=torch.long)
        offsets = torch.tensor(np.cumsum([0] + [len(vmap.pieces[i]) for i in have[:-1]]), dtype=torch.long)
        out[have] = F.embedding_bag(flat, chain_rows, offsets, mode="mean")
    for tid, cid in vmap.special.items():
        out[tid] = chain_rows[cid]
    return out


TRANSFERS = {"fvt": fvt}  # BridgeOptions.transfer -> (chain rows, VocabMap) -> target rows


def bridge_spec(target: ModelSpec, tok, multiple: int) -> ModelSpec:
    """The plan's target in the target tokenizer: padded vocabulary, its bos/eos/pad ids."""
    v = math.ceil(len(tok) / multiple) * multiple
    return make_spec(target.model_dump() | {"vocab_size": v, "bos_token_id": tok.bos_token_id,
                                            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})


def vocab_tensors(spec: ModelSpec) -> list[str]:
    """Names of the tensors with a vocabulary axis (the embedding and an untied head)."""
    return [n for n, roles in arch.global_table(spec).items() if any(a == "vocab" for a, _ in roles)]
