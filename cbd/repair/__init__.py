"""Teacher-free repair of a subset: the readers of dropped units refit by ridge least squares.

After Trans keeps some of an anchor's FFN neurons or query heads, the projection that reads
them (llama ``mlp.down_proj`` / ``self_attn.o_proj``, GPT-2 ``mlp.c_proj`` / ``attn.c_proj``:
the tensors whose role is ``(ffn|q, "in")`` in ``cbd.shape.arch``) is refit on calibration
activations of that same anchor, so the pruned block's output is the best linear fit of the
unpruned block's output (forward passes of the anchor only: no teacher, no gradients).

Nothing in the request path calls this: :func:`repair` and :func:`repaired_linit_state` are for
callers that opt in (``bench/repair.py``).
"""

from cbd.repair.refit import READERS, Stats, calibration_stats, reader_keys, repair, repaired_linit_state

__all__ = ["READERS", "Stats", "calibration_stats", "reader_keys", "repair", "repaired_linit_state"]
