"""``cbd store ls|pin|unpin|gc``: the operator's view of the artifact store and its budget
(``worker.store_budget``). Registered with ``cbd serve`` and ``cbd worker`` (``worker.cli.register``)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

store_app = typer.Typer(help="the artifact store: list, pin, unpin, evict to the budget", no_args_is_help=True)
Ids = Annotated[list[str], typer.Argument(help="checkpoint ids (32 hex characters)")]


def _check(ids: list[str]) -> None:
    from cbd.core import artifacts

    bad = [i for i in ids if not artifacts.ID_RE.match(i)]
    if bad:
        raise typer.BadParameter(f"{', '.join(bad)}: a checkpoint id is 32 lowercase hex characters")


@store_app.command("ls")
def ls(as_json: Annotated[bool, typer.Option("--json", help="one JSON object per checkpoint")] = False) -> None:
    """Checkpoints, least recently used first (the next evicted), with size, last access, pinned, held."""
    from worker import store_budget

    entries, other = store_budget.scan()
    now = time.time()
    for e in entries:
        if as_json:
            print(json.dumps({"id": e.id, "bytes": e.bytes, "last_access": e.last_access, "pinned": e.pinned,
                              "held": e.held}))
        else:
            flags = ",".join(f for f, on in (("pinned", e.pinned), ("held", e.held)) if on) or "-"
            print(f"{e.id}  {e.bytes:>14,d} B  used {now - e.last_access:>9.0f} s ago  {flags}")
    if not as_json:
        budget = store_budget.Budget.from_env()
        total = other + sum(e.bytes for e in entries)
        print(f"{len(entries)} checkpoints, {total:,d} bytes (staging {other:,d}); budget: "
              f"max {budget.max_bytes if budget.max_bytes is not None else 'none'}, "
              f"min free {budget.min_free_bytes}")


@store_app.command("pin")
def pin(ids: Ids) -> None:
    """Never evict these checkpoints (exit 3 if one does not exist)."""
    from worker import store_budget

    _check(ids)
    missing = [i for i in ids if not store_budget.pin(i)]
    for i in ids:
        if i not in missing:
            print(f"pinned {i}")
    if missing:
        typer.echo(f"error: no checkpoint {', '.join(missing)} in the store", err=True)
        raise typer.Exit(3)


@store_app.command("unpin")
def unpin(ids: Ids) -> None:
    """Let these checkpoints be evicted again."""
    from worker import store_budget

    _check(ids)
    for i in ids:
        print(f"{'unpinned' if store_budget.unpin(i) else 'was not pinned:'} {i}")


@store_app.command("gc")
def gc(
    max_bytes: Annotated[str | None, typer.Option(help="cap for this round (default $CBD_STORE_MAX_BYTES), e.g. 20G")] = None,
    min_free_bytes: Annotated[str | None, typer.Option(help="free space to keep (default $CBD_STORE_MIN_FREE_BYTES)")] = None,
) -> None:
    """Evict least recently used checkpoints (never pinned, held or being written) to the budget now."""
    from worker import store_budget

    try:
        env = store_budget.Budget.from_env()
        budget = store_budget.Budget(
            max_bytes=store_budget.parse_bytes(max_bytes, name="--max-bytes") if max_bytes is not None else env.max_bytes,
            min_free_bytes=store_budget.parse_bytes(min_free_bytes, name="--min-free-bytes")
            if min_free_bytes is not None else env.min_free_bytes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    r = store_budget.enforce(budget)
    for i in r.evicted:
        print(f"evicted {i}")
    print(f"{len(r.evicted)} evicted, {r.freed_bytes:,d} bytes freed; {r.bytes_after:,d} bytes in the store"
          + ("" if r.within else " (still over: the rest is pinned, held or being written)"))
