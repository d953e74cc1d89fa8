"""Teacher-free repair of a subset: the readers of pruned units refit by ridge least squares.

After Trans keeps some of an anchor's FFN neurons, query heads or layers, the projection that
reads them (llama ``mlp.down_proj`` / ``self_attn.o_proj``, GPT-2 ``mlp.c_proj`` / ``attn.c_proj``:
the tensors whose role is ``(ffn|q, "in")`` in ``cbd.shape.arch``) is refit so that the pruned
model reproduces the anchor's outputs (forward passes only: no teacher, no gradients).

:func:`insitu_repair` is what chain builds and requests use (``cbd.chain.build``,
``cbd.inits.calibration.repair_terms``); :func:`repair`, the fit on the anchor's own inputs, is
exact for FFN and head pruning alone and kept for ``bench/repair.py`` and the tests.
"""

from cbd.repair.refit import READERS, Stats, calibration_stats, insitu_repair, reader_keys, repair

__all__ = ["READERS", "Stats", "calibration_stats", "insitu_repair", "reader_keys", "repair"]
