"""The real worker (``python -m worker.main``), slowed down so that fault tests can kill it mid-job.

Test-only: nothing in cbd/, app/ or worker/ knows about it. Run as
``python tests/_slow_worker.py --queues fast,slow --redis-url URL`` with

- ``CBD_TEST_SLOW_TENSOR_S``: sleep this long before each interpolated tensor, so a job spends
  seconds inside ``StreamingWriter`` with a partial ``model.safetensors`` in its staging folder;
- ``CBD_TEST_STUB_CHAINS``: a folder where ``build_chain`` jobs build a tiny random chain
  (``tests/random_chain.py``, each anchor file delayed by ``CBD_TEST_SLOW_ANCHOR_S`` while
  its staging folder exists) in place of
  the real distillation, which needs the teacher: a slow-queue job that writes files for seconds;
- ``CBD_TEST_SLOW_UPLOAD_S``: sleep this long after each object uploaded to an S3 store, so a job
  spends seconds with some of an artifact's files in the bucket and not its index (kill tests);
- ``CBD_TEST_ENOSPC_FROM_TENSOR``: from this tensor of ``model.safetensors`` on, the file write
  fails with ``OSError(ENOSPC)`` inside ``StreamingWriter``'s own I/O wrapper, as on a full disk
  (the store-full path end to end without a tmpfs, hence without root).
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def slow_tensors(delay: float) -> None:
    from cbd.shape import linit

    original = linit.LInit.tensor

    def tensor(self, name, alpha=None, rows=None, **kwargs):  # kwargs: the owner's allocator
        time.sleep(delay)
        return original(self, name, alpha, rows=rows, **kwargs)

    linit.LInit.tensor = tensor


def full_disk_from(n: int) -> None:
    import errno

    from cbd.tensors.writer import StreamingWriter

    original = StreamingWriter.write

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, name, tensor):
        if self._next >= n:
            self._io(full)
        return original(self, name, tensor)

    StreamingWriter.write = write


def slow_uploads(delay: float) -> None:
    from cbd.core import objstore

    original = objstore.S3Store.put_file

    def put_file(self, key, path):
        original(self, key, path)
        time.sleep(delay)

    objstore.S3Store.put_file = put_file


def stub_chain_builds(root: Path, delay: float) -> None:

    from random_chain import build_random_chain

    from cbd.store import anchors as chainstore

    original = chainstore.write_safetensors

    def write_safetensors(*args, **kwargs):  # inside write_anchor: its staging folder exists meanwhile
        time.sleep(delay)
        return original(*args, **kwargs)

    chainstore.write_safetensors = write_safetensors

    def build_chain(name, *, progress=None):
        (progress or (lambda _: None))({"stage": "stub build", "fraction": 0.0})
        return build_random_chain(root, name)

    sys.modules["cbd.chain.build"] = types.SimpleNamespace(build_chain=build_chain)


if __name__ == "__main__":
    if os.environ.get("CBD_TEST_SLOW_TENSOR_S"):
        slow_tensors(float(os.environ["CBD_TEST_SLOW_TENSOR_S"]))
    if os.environ.get("CBD_TEST_SLOW_UPLOAD_S"):
        slow_uploads(float(os.environ["CBD_TEST_SLOW_UPLOAD_S"]))
    if os.environ.get("CBD_TEST_ENOSPC_FROM_TENSOR"):
        full_disk_from(int(os.environ["CBD_TEST_ENOSPC_FROM_TENSOR"]))
    if os.environ.get("CBD_TEST_STUB_CHAINS"):
        stub_chain_builds(Path(os.environ["CBD_TEST_STUB_CHAINS"]), float(os.environ.get("CBD_TEST_SLOW_ANCHOR_S", "0")))
    from worker.main import main

    raise SystemExit(main())
