"""RQ side of the service: the queue contract (``queue``), thin jobs (``jobs``), the worker loop (``main``)."""
