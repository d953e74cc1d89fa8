"""The streamed LInit write: recycled buffers, zero-copy anchor views, tensors in row blocks.

These are the pieces behind ``bench/linit_write.py``'s numbers; each test checks that a speed
device changes no byte and never lets a caller touch an anchor's own memory.
"""

from __future__ import annotations

import threading

import pytest
import torch
from random_chain import tiny_gpt2_spec, tiny_spec

from cbd.shape import arch
from cbd.shape.importance import importance
from cbd.shape.linit import Anchor, make_linit
from cbd.shape.trans import rows_independent
from cbd.store.anchors import load_alignment, load_anchor
from cbd.store.checkpoint import write_weights
from cbd.tensors.header import read_header
from cbd.tensors.pool import BufferPool, empty, intermediates, pooled, recycle
from cbd.tensors.reader import LazyReader
from cbd.tensors.writer import StreamingWriter, write_safetensors
from cbd.train.models import build_model, random_state

BETWEEN = dict(num_hidden_layers=3, hidden_size=80, num_attention_heads=5, num_key_value_heads=5, intermediate_size=70)


@pytest.fixture(scope="module")
def pair(random_chain):
    m = random_chain
    return load_anchor(m, "a1"), load_anchor(m, "a0"), load_alignment(m, "a1", "a0")


# --- BufferPool -------------------------------------------------------------------------------

def test_pool_recycles_what_it_lent_and_ignores_the_rest():
    pool = BufferPool(min_bytes=64)
    a = pool.empty((8, 8), torch.float32)
    ptr = a.data_ptr()
    assert pool.lent(a)
    pool.give(a)
    assert not pool.lent(a)
    b = pool.empty((4, 16), torch.float32)  # same dtype and size: the same memory, reshaped
    assert b.data_ptr() == ptr and b.shape == (4, 16) and pool.allocated == 1
    foreign = torch.empty(64)
    pool.give(foreign)  # not the pool's: nothing happens
    pool.give(b[:2])  # part of a lent buffer: ignored, b stays lent
    assert pool.lent(b) and pool.empty((64,), torch.float32).data_ptr() not in (ptr, foreign.data_ptr())
    assert pool.allocated == 2


def test_pool_leaves_small_tensors_to_the_allocator():
    pool = BufferPool(min_bytes=1024)
    t = pool.empty((3,), torch.float32)
    assert not pool.lent(t) and pool.allocated == 0


def test_pool_give_from_another_thread():
    pool = BufferPool(min_bytes=64)
    bufs = [pool.empty((32,), torch.float32) for _ in range(4)]
    threads = [threading.Thread(target=pool.give, args=(b,)) for b in bufs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    again = {pool.empty((32,), torch.float32).data_ptr() for _ in range(4)}
    assert again == {b.data_ptr() for b in bufs} and pool.allocated == 4



def test_intermediates_go_back_at_the_end_of_their_block_except_what_is_kept():
    pool = BufferPool(min_bytes=64)
    with pooled(pool):
        with intermediates() as scope:
            a, b, c = (empty((16,), torch.float32) for _ in range(3))
            kept_view = scope.keep(c[2:])  # a view keeps its whole buffer
            recycle(a)  # given back early and lent again in the block: given back once
            again = empty((16,), torch.float32)
            assert again.data_ptr() == a.data_ptr()
            small = empty((2,), torch.float32)  # left to the allocator: not the pool's
        assert not pool.lent(b) and not pool.lent(again) and pool.lent(c) and not pool.lent(small)
        with intermediates():  # an outer block
            with intermediates() as inner:
                d = inner.keep(empty((16,), torch.float32))
            assert pool.lent(d)  # kept by the inner block: now the outer block's
        assert not pool.lent(d) and d.data_ptr() == b.data_ptr()  # b's buffer, given back and lent again
        assert {empty((16,), torch.float32).data_ptr() for _ in range(2)} == {a.data_ptr(), b.data_ptr()}
    assert pool.allocated == 3 and kept_view.data_ptr() == c.data_ptr() + 8
    with intermediates() as scope:  # no active pool: nothing to do
        assert scope.keep(empty((16,), torch.float32)).shape == (16,)

# --- LazyReader.view --------------------------------------------------------------------------

def test_views_equal_reads_and_are_recognised(pair):
    small, _, _ = pair
    r = small.read
    for name in r.entries:
        v = r.view(name)
        assert torch.equal(v, r(name)), name
        assert r.is_view(v) and not r.is_view(r(name))


def test_view_of_a_bfloat16_file_is_an_owned_float32_copy(tmp_path):
    path = tmp_path / "w.safetensors"
    t = torch.randn(6, 5).to(torch.bfloat16)
    write_safetensors(path, {"w": t})
    r = LazyReader(path)
    v = r.view("w")
    assert v.dtype == torch.float32 and torch.equal(v, t.float()) and not r.is_view(v)


def test_views_fall_back_to_copies_where_mapping_is_refused(tmp_path, monkeypatch):
    import mmap

    def refuse(*a, **kw):
        raise OSError(19, "No such device")

    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": torch.arange(12.0).view(3, 4)})
    monkeypatch.setattr(mmap, "mmap", refuse)
    r = LazyReader(path)
    v = r.view("w")
    assert torch.equal(v, torch.arange(12.0).view(3, 4)) and not r.is_view(v)


def test_old_views_still_read_right_after_their_pages_are_dropped(pair):
    small, _, _ = pair
    r = small.read
    names = r.keys()
    views = [r.view(n) for n in names]  # each new view drops the previous one's pages
    for n, v in zip(names, views, strict=True):
        assert torch.equal(v, r(n)), n


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.4])
@pytest.mark.parametrize("which", ["a1", "a0", "between"])
def test_linit_never_returns_anchor_memory(pair, alpha, which):
    """Even where Trans is the identity (a target equal to an anchor), the caller owns the result."""
    small, big, align = pair
    tgt = {"a1": small.spec, "a0": big.spec, "between": tiny_spec(**BETWEEN)}[which]
    li = make_linit(tgt, small, big, alpha=alpha, alignment=align)
    for name, t in li.tensors():
        assert not small.owns(t) and not big.owns(t), name
        before = (small.read(name).clone() if name in small.read.entries else None)
        t.add_(1.0)  # would crash on the read-only mapping, or change the anchor
        if before is not None:
            assert torch.equal(small.read(name), before)


# --- LInit in row blocks -----------------------------------------------------------------------

def _concat(chunks):
    out: dict[str, list[torch.Tensor]] = {}
    for name, t in chunks:
        out.setdefault(name, []).append(t.clone())
    return out


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.3])
def test_chunks_concatenate_to_the_whole_tensors(pair, alpha):
    small, big, align = pair
    li = make_linit(tiny_spec(**BETWEEN), small, big, alpha=alpha, alignment=align)
    whole = li.state()
    parts = _concat(li.chunks(max_bytes=1000))  # the 128 x 80 embedding in blocks of 3 rows
    assert list(parts) == arch.param_names(li.target)
    assert len(parts["model.embed_tokens.weight"]) > 10
    for name, blocks in parts.items():
        assert torch.equal(torch.cat(blocks), whole[name]), name


def test_row_blocks_of_a_tensor_whose_rows_mix_are_refused(pair):
    small, big, align = pair
    li = make_linit(tiny_spec(**BETWEEN), small, big, alpha=0.3, alignment=align)
    with pytest.raises(ValueError, match="computed whole"):
        li.tensor("model.layers.0.mlp.down_proj.weight", rows=slice(0, 2))


def _gpt2_anchor(tmp_path, spec, seed):
    state = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed))
             for k, v in random_state(spec, seed=seed).items()}
    path = tmp_path / f"gpt2-{seed}.safetensors"
    write_safetensors(path, state)
    batch = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return Anchor(spec, LazyReader(path), importance(build_model(spec, state), spec, batch))


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_chunks_concatenate_to_the_whole_tensors(tmp_path, tie):
    """GPT-2: the embedding's new channels carry each row's mean, positions pass through."""
    big = _gpt2_anchor(tmp_path, tiny_gpt2_spec(tie_word_embeddings=tie), 0)
    small_spec = tiny_gpt2_spec(tie_word_embeddings=tie, num_hidden_layers=1, hidden_size=16,
                                num_attention_heads=2, num_key_value_heads=2, intermediate_size=20)
    small = _gpt2_anchor(tmp_path, small_spec, 1)
    tgt = tiny_gpt2_spec(tie_word_embeddings=tie, hidden_size=40, num_attention_heads=5, num_key_value_heads=5)
    li = make_linit(tgt, small, big, alpha=0.4)
    whole = li.state()
    parts = _concat(li.chunks(max_bytes=400))
    chunked = [n for n, blocks in parts.items() if len(blocks) > 1]
    assert "transformer.wte.weight" in chunked and "transformer.wpe.weight" in chunked
    assert all(rows_independent(n, tgt) for n in chunked)
    for name, blocks in parts.items():
        assert torch.equal(torch.cat(blocks), whole[name]), name


# --- the streamed write ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_in_blocks_is_byte_identical_to_whole_tensors(pair, tmp_path, dtype):
    small, big, align = pair
    li = make_linit(tiny_spec(**BETWEEN), small, big, alpha=0.3, alignment=align)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_weights(tmp_path / "a", li.target, li.tensors(), dtype=dtype, recipe={"r": 1})
    write_weights(tmp_path / "b", li.target, li.chunks(max_bytes=1000), dtype=dtype, recipe={"r": 1})
    a, b = ((tmp_path / d / "model.safetensors").read_bytes() for d in "ab")
    assert a == b
    header, _ = read_header(tmp_path / "a" / "model.safetensors")
    assert header["model.embed_tokens.weight"]["shape"] == [128, 80]


def _writer(tmp_path):
    layout = [("x", torch.float32, (4, 3)), ("y", torch.float32, (2,))]
    return StreamingWriter(tmp_path / "w.safetensors", layout)


@pytest.mark.parametrize("bad, message", [
    (lambda w: w.write("x", torch.zeros(4, 2)), "expected x"),  # wrong row width
    (lambda w: (w.write("x", torch.zeros(3, 3)), w.write("x", torch.zeros(2, 3))), "rows 3"),  # too many rows
    (lambda w: (w.write("x", torch.zeros(1, 3)), w.write("y", torch.zeros(2))), "expected x"),  # x unfinished
    (lambda w: (w.write("x", torch.zeros(4, 3)), w.write("y", torch.zeros(2)), w.write("y", torch.zeros(2))),
     "all 2 tensors are written"),
])
def test_writer_refuses_blocks_out_of_order(tmp_path, bad, message):
    w = _writer(tmp_path)
    with pytest.raises(ValueError, match=message):
        bad(w)
    w._f.close()


def test_writer_refuses_to_close_with_a_tensor_half_written(tmp_path):
    w = _writer(tmp_path)
    w.write("x", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_write_all_recycles_each_tensor_once_written(tmp_path):
    """The writer gives each tensor back after writing it, so a long stream needs few buffers."""
    pool = BufferPool(min_bytes=64)
    layout = [(f"t{i}", torch.float32, (16, 16)) for i in range(40)]

    def produce():
        for i in range(40):
            yield f"t{i}", pool.empty((16, 16), torch.float32).fill_(i)

    with StreamingWriter(tmp_path / "w.safetensors", layout) as w, pooled(pool):
        w.write_all(produce(), ahead=2, written=pool.give)
    r = LazyReader(tmp_path / "w.safetensors")
    assert all(torch.equal(r(f"t{i}"), torch.full((16, 16), float(i))) for i in range(40))
    assert pool.allocated <= 5  # ahead (2) + one being written + one being filled + one handed over
