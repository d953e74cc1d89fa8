"""safetensors I/O with torch: the one place that reads and writes safetensors.

- Reads are lazy: one tensor at a time from a memory-mapped file, after the header has been
  checked (size cap, JSON, dtypes, offsets inside the file, no overlaps, no duplicate keys);
  a file can also be verified against the sha256 its manifest records. Nothing is ever read
  with ``torch.load``.
- Writes stream: :class:`~cbd.tensors.writer.StreamingWriter` writes the header first (shapes are known from the
  plan) and then each tensor as it is produced, so a checkpoint as large as the teacher never
  sits in memory twice. The layout is exactly safetensors' (8-byte little-endian header length,
  JSON header padded with spaces to 8 bytes, tensors in header order).
- Large tensors of one streamed write are recycled (:class:`~cbd.tensors.pool.BufferPool`): a fresh large
  allocation costs a page fault per 4 KiB page on first touch, which is most of the time of a
  LInit (measured: filling 216 MiB of fresh memory 0.09-0.14 s, of recycled memory 0.012 s),
  so the executor of a streamed LInit (``LInit.chunks``) hands the pool's ``empty`` to Trans and
  the blend as their allocator, gives every intermediate back once its piece is computed
  (:func:`~cbd.tensors.pool.intermediates`), and the writer gives each piece back once it is on disk.
"""
