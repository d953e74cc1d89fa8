"""cbd: initialisations for small language models by chain-based distillation.

    cbd init --layers 4 --hidden 256 --heads 4 --kv-heads 2 --ffn 512 --out ./init
    cbd inspect ./init
    cbd chain build tiny          cbd chain list
    cbd push ./init me/tiny-init  cbd fetch --layers 4 --hidden 256 --heads 4 --out ./init
    cbd serve                     cbd worker --queues fast,slow

Exit codes (a CI script can rely on them): 0 done, 2 bad input, 3 not found / not built,
4 integrity, 5 service or Hub unreachable, 1 anything else.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cbd.cli.fetch import register as register_fetch
from cbd.cli.options import Ffn, Heads, Hidden, KvHeads, Layers, SpecFile, request_from
from cbd.errors import (
    AssetUnavailableError,
    CBDError,
    ChainIncompatibleError,
    ChainNotBuiltError,
    FetchChecksumError,
    FetchError,
    FetchJobFailedError,
    FetchNotFoundError,
    FetchRefusedError,
    FetchUnavailableError,
    HubAuthError,
    HubConflictError,
    HubError,
    HubNotFoundError,
    HubPermissionError,
    HubUnavailableError,
    IntegrityError,
    InvalidPushError,
    JobCancelledError,
    RecipeError,
    ShapeError,
    StorageFullError,
    StoreUnavailableError,
    UnknownNameError,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
chain_app = typer.Typer(no_args_is_help=True, help="Build and list anchor chains.")
app.add_typer(chain_app, name="chain")
console = Console(stderr=True)

# The exit code of every error (the nearest class of its MRO listed): 0 done, 2 bad input, 3 not found
# or not built, 4 integrity, 5 service or Hub unreachable, 1 anything else. HTTP: app.errors.HTTP_STATUS.
EXIT: dict[type[CBDError], int] = {
    CBDError: 1,
    ShapeError: 2,
    ChainIncompatibleError: 2,
    RecipeError: 2,
    FetchError: 1,  # each cause has its own subclass below
    FetchRefusedError: 2,
    UnknownNameError: 3,
    ChainNotBuiltError: 3,
    FetchJobFailedError: 3,
    FetchNotFoundError: 3,
    IntegrityError: 4,
    FetchChecksumError: 4,
    AssetUnavailableError: 5,
    # a Hub error by its cause: a malformed push or a refused token is bad input, a missing repo or
    # revision is not found, a Hub that cannot be reached (or fails unexplained) is unreachable
    HubError: 5,
    InvalidPushError: 2,
    HubAuthError: 2,
    HubPermissionError: 2,
    HubNotFoundError: 3,
    HubConflictError: 1,
    HubUnavailableError: 5,
    FetchUnavailableError: 5,
    StorageFullError: 1,
    StoreUnavailableError: 5,
    JobCancelledError: 3,  # as a job that failed
}


def exit_code(exc: CBDError) -> int:
    """The CLI's exit code of an error: the nearest class of its MRO in ``EXIT``."""
    return next(EXIT[c] for c in type(exc).__mro__ if c in EXIT)


@app.command()
def init(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (created)")],
    spec: SpecFile = None, layers: Layers = None, hidden: Hidden = None, heads: Heads = None,
    kv_heads: KvHeads = None, ffn: Ffn = None,
    chain: Annotated[str | None, typer.Option(help="chain name (default: the only or 'default' chain)")] = None,
    alpha: Annotated[float | None, typer.Option(min=0, max=1, help="weight of the smaller anchor")] = None,
    calibrate: Annotated[bool | None, typer.Option("--calibrate/--no-calibrate", help=(
        "pick alpha by validation loss; --no-calibrate: alpha0 (default: the spec file's, else calibrate)"))] = None,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
) -> None:
    """Initialise a model of the given shape locally (no service) into OUT."""
    from cbd.core.artifacts import local_copy
    from cbd.core.chainstore import load_manifest
    from cbd.core.plan import make_plan
    from cbd.run import run_plan

    req = request_from(spec, layers, hidden, heads, kv_heads, ffn, chain=chain, alpha=alpha,
                       calibrate=calibrate, dtype=dtype)
    manifest = load_manifest(req.chain or default_chain())
    plan = make_plan(req, manifest)
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    info = run_plan(plan, progress=_printer())
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(local_copy(info.id), out)
    console.print(f"[green]wrote[/] {out} (id {info.id}, alpha {info.alpha:.4f}, anchors "
                  f"{', '.join(a['name'] for a in info.anchors)})")


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="checkpoint folder, anchor folder or .safetensors file")]) -> None:
    """Shape, parameter count and provenance of a checkpoint or anchor."""
    from cbd.core.files import sha256_file
    from cbd.core.spec import ModelSpec
    from cbd.tensors.header import read_header

    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "model.safetensors"
    if not weights.is_file():
        raise UnknownNameError(f"{path} is not a checkpoint: no {weights.name} there",
                               allowed="a checkpoint or anchor folder, or a .safetensors file")
    entries, meta = read_header(weights)
    table = Table(show_header=False)
    if (folder / "config.json").is_file():
        spec = ModelSpec.from_hf_config(json.loads((folder / "config.json").read_text()))
        for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "kv_heads",
                  "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings"):
            table.add_row(k, str(getattr(spec, k)))
        table.add_row("parameters", f"{spec.num_params():,} ({spec.non_embedding_params():,} non-embedding)")
    dtypes = sorted({e["dtype"] for e in entries.values()})
    table.add_row("tensors", f"{len(entries)} ({', '.join(dtypes)})")
    table.add_row("sha256", sha256_file(weights))
    recipe = json.loads(meta["cbd_recipe"]) if "cbd_recipe" in meta else None
    if recipe:
        table.add_row("chain", f"{recipe['chain']} ({recipe['chain_manifest_sha256'][:12]})")
        table.add_row("anchors", ", ".join(f"{a['name']} {a['sha256'][:12]}" for a in recipe["anchors"]))
        table.add_row("alpha", f"{recipe['alpha']:.4f} ({recipe['alpha_source']})")
        table.add_row("code", recipe["code_version"])
    if (folder / "anchor.json").is_file():
        a = json.loads((folder / "anchor.json").read_text())
        table.add_row("anchor", f"{a['name']} (parent {a['parent']})")
        table.add_row("metrics", json.dumps(a["metrics"]))
    Console().print(table)


@chain_app.command("build")
def chain_build(
    recipe: Annotated[str, typer.Argument(help="recipe name (anchors/, then $CBD_RECIPES) or a .toml path anywhere")],
    force: Annotated[bool, typer.Option(help="rebuild even when built (finished anchors are still reused)")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto (overrides the recipe)")] = None,
    queue: Annotated[bool, typer.Option("--queue", help="submit to the workers' slow queue instead: one job per "
                                        "anchor, each depending on the one before, then the manifest")] = False,
    redis_url: Annotated[str | None, typer.Option(help="with --queue: the workers' Redis ($REDIS_URL)")] = None,
) -> None:
    """Distil the recipe's source into a chain of anchors (resumable), here or on the workers."""
    from cbd.core.recipe import load_recipe, recipe_path

    r = load_recipe(recipe)
    if queue:
        elsewhere = Path(recipe).suffix == ".toml" and Path(recipe).resolve() != recipe_path(r.name).resolve()
        if force or device or elsewhere:
            console.print("[red]error:[/] --queue builds <name>.toml as the workers read it (anchors/ or a "
                          "$CBD_RECIPES folder): no .toml path elsewhere, --force or --device")
            raise typer.Exit(2)
        _enqueue_chain(r, redis_url)
        return
    import os

    from cbd.core.threads import thread_env

    os.environ.update(thread_env())  # before torch is imported: its pool sized to this machine's CPUs
    from cbd.chain.build import build_chain

    if device:
        r = r.model_copy(update={"device": device})
    m = build_chain(r, force=force)
    _print_chain(m)


@chain_app.command("plan")
def chain_plan(
    recipe: Annotated[str, typer.Argument(help="recipe name (anchors/, then $CBD_RECIPES) or a .toml path anywhere")],
) -> None:
    """The resolved ladder (fractions of the source made shapes), parameter counts and an estimated build
    time, before anything runs (a Hub source: only its config.json and README.md are fetched)."""
    from cbd.chain.build import resolve, source_spec
    from cbd.core.ladder import estimate_build
    from cbd.core.plan import target_spec
    from cbd.core.recipe import load_recipe
    from cbd.data.sources import source_info

    r = load_recipe(recipe)
    info = source_info(r.source, r.license)
    src = source_spec(r)
    resolved = resolve(r)
    zero = target_spec(r.anchor_zero, src) if r.anchor_zero is not None else src
    specs = [zero, *(target_spec(a, src) for a in resolved.anchors)]
    est = estimate_build(resolved, specs)
    lines = [f"chain {r.name}: source {r.source}" + (f" (commit {info.commit})" if info.commit else "")
             + f", licence {info.license} (from the {info.license_from}), tokenizer {r.tokenizer}"]
    n_src = src.non_embedding_params()
    rows = [("a0", None, zero, "source" if r.anchor_zero is None else f"taught by {r.anchor_zero.foreign}")]
    rows += [(a.name, a.fraction, spec, str(e["steps"])) for a, spec, e in zip(resolved.anchors, specs[1:],
                                                                                est["anchors"], strict=True)]
    head = ("anchor", "fraction", "L x d", "heads/kv", "head dim", "ffn", "non-emb params", "of source", "params",
            "steps")
    table = [head] + [(name, "" if frac is None else f"{frac:g}", f"{s.num_hidden_layers} x {s.hidden_size}",
                       f"{s.num_attention_heads}/{s.kv_heads}", str(s.head_dim), str(s.ffn),
                       f"{s.non_embedding_params():,}", f"{s.non_embedding_params() / n_src:.1%}",
                       f"{s.num_params():,}", steps) for name, frac, s, steps in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
              for row in table]
    lines.append(f"estimated build: {est['cpu_minutes_2cpu']} minutes on 2 CPU cores ({est['flops']:.3g} FLOPs of "
                 f"distillation at {est['rate']})")
    print("\n".join(lines))


def _enqueue_chain(r, redis_url: str | None) -> None:
    """Hand the build to the workers through the ``cbd.queue`` entry point (``worker.cli.enqueue_chain``)."""
    from importlib.metadata import entry_points

    found = entry_points(group="cbd.queue", name="chain")
    if not found:
        console.print("[red]error:[/] --queue needs the service extra (pip install 'cbd[service]')")
        raise typer.Exit(2)
    next(iter(found)).load()(r, redis_url)


@chain_app.command("list")
def chain_list() -> None:
    """Built chains and their anchors."""
    from cbd.core.chainstore import list_chains, load_manifest
    from cbd.core.recipe import list_recipes

    built = list_chains()
    for name in built:
        _print_chain(load_manifest(name))
    unbuilt = [r for r in list_recipes() if r not in built]
    if unbuilt:
        console.print(f"recipes not built yet: {', '.join(unbuilt)} (cbd chain build NAME)")


@chain_app.command("push")
def chain_push(name: Annotated[str, typer.Argument(help="a chain built on this host")]) -> None:
    """Publish a chain built here to the S3 store (CBD_STORE_URL): its files, then its manifest last."""
    from cbd.core.chainstore import push_chain
    from cbd.core.objstore import get_store

    out = push_chain(name)
    console.print(f"[green]pushed[/] chain {name} to {get_store().describe()}: {out['uploaded']} files "
                  f"({out['bytes']:,} bytes) uploaded, {out['skipped']} unchanged")
    print(json.dumps(out))


@chain_app.command("pull")
def chain_pull(name: Annotated[str, typer.Argument(help="a chain in the S3 store")]) -> None:
    """Download a chain from the S3 store into this host's cache, every file's sha256 checked."""
    from cbd.core.chainstore import ensure_local
    from cbd.core.manifest import chain_dir

    m = ensure_local(name)
    console.print(f"[green]chain {name}[/] in {chain_dir(name)} (manifest {m.sha256[:12]})")
    print(json.dumps({"chain": name, "manifest_sha256": m.sha256, "path": str(chain_dir(name))}))


@app.command()
def push(
    folder: Annotated[Path, typer.Argument(help="checkpoint folder")],
    repo_id: Annotated[str, typer.Argument(help="namespace/name on the Hub")],
    private: Annotated[bool, typer.Option(help="create the repo private")] = False,
    revision: Annotated[str, typer.Option(help="branch to commit to")] = "main",
    parent_commit: Annotated[str | None, typer.Option(help="fail unless the branch is at this commit")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Hub endpoint (default $HF_ENDPOINT)")] = None,
) -> None:
    """Push a checkpoint folder to the Hub in one atomic commit (token from $HF_TOKEN)."""
    import os

    from cbd.store.hub import push_folder

    res = push_folder(folder, repo_id, token=os.environ.get("HF_TOKEN"), endpoint=endpoint, private=private,
                      revision=revision, parent_commit=parent_commit)
    console.print("[yellow]no change[/]: nothing to commit" if res.no_op else f"[green]pushed[/] {res.commit_url}")
    print(json.dumps({"commit_sha": res.commit_sha, "commit_url": res.commit_url, "no_op": res.no_op}))


def default_chain() -> str:
    """The service's rule (``cbd.core.manifest.pick_default_chain``) with ``$CBD_DEFAULT_CHAIN``."""
    import os

    from cbd.core.chainstore import list_chains
    from cbd.core.manifest import DEFAULT_CHAIN, pick_default_chain

    name, warning = pick_default_chain(os.environ.get("CBD_DEFAULT_CHAIN") or DEFAULT_CHAIN, list_chains())
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    return name


def _print_chain(m) -> None:
    t = Table(title=f"chain {m.name} (source {m.source}, tokenizer {m.tokenizer})")
    for col in ("anchor", "L x d", "heads/kv", "ffn", "non-emb params", "held-out loss", "tokens", "wall s"):
        t.add_column(col)
    for a in m.anchors:
        s = a.spec
        t.add_row(a.name, f"{s.num_hidden_layers} x {s.hidden_size}", f"{s.num_attention_heads}/{s.kv_heads}",
                  str(s.ffn), f"{a.non_embedding_params:,}", str(a.metrics.get("heldout_loss", "")),
                  f"{a.metrics.get('tokens', 0):,}", str(a.metrics.get("wall_s", "")))
    Console().print(t)


def _printer():
    last = {"stage": None}

    def fn(p: dict) -> None:
        if p.get("stage") != last["stage"]:
            last["stage"] = p.get("stage")
            console.print(f"[dim]{p.get('stage')}[/]")
    return fn


def _register_plugins() -> None:
    """Commands other packages add (``cbd serve``/``cbd worker`` from ``worker``) through the
    ``cbd.commands`` entry point group, so the library knows neither the web nor the queue."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="cbd.commands"):
        try:
            register = ep.load()
        except ImportError:  # the service extra is not installed
            continue
        register(app)


register_fetch(app)
_register_plugins()


def _usage_errors() -> tuple[type, ...]:
    """click's ClickException and typer's vendored copy of it (typer 0.2x ships its own click as
    ``typer._click``): a missing or invalid option is a usage error, exit 2, either way."""
    import click

    return tuple({click.ClickException} | {c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"})


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        rc = app(standalone_mode=False)  # click returns typer.Exit codes instead of raising
    except CBDError as exc:
        console.print(f"[red]error:[/] {exc.message}")
        if exc.allowed is not None:
            console.print(f"allowed: {exc.allowed}")
        sys.exit(exit_code(exc))
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0)
    except Exception as exc:  # click usage errors and pydantic validation
        from pydantic import ValidationError

        if isinstance(exc, _usage_errors()):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, ValidationError):
            console.print(f"[red]invalid input:[/] {exc}")
            sys.exit(2)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
