"""The "chains built here" tables of docs/results.md, from built chains' manifests.

    python bench/chain_table.py default tiny     # -> docs/data/chain-<name>.json + markdown on stdout

Every number is one the build itself measured and recorded in ``manifest.json`` (held-out loss
per domain at the start and the end of each step, the repair's validation losses, wall time);
this only collects them. The build command is ``OMP_NUM_THREADS=1 cbd chain build <name>``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cbd.core.manifest import load_manifest

DATA = Path(__file__).resolve().parent.parent / "docs" / "data"
RECIPES = Path(__file__).resolve().parent / "recipes"  # experiments' recipes (bench/recipes/<name>.toml)


def build_command(name: str) -> str:
    own = RECIPES / f"{name}.toml"
    return f"OMP_NUM_THREADS=1 cbd chain build {f'bench/recipes/{own.name}' if own.is_file() else name}"


def table(name: str) -> str:
    m = load_manifest(name)
    rows = []
    for a in m.anchors:
        s, mt = a.spec, a.metrics or {}
        rows.append({"name": a.name, "shape": list(s.shape), "non_embedding_params": a.non_embedding_params,
                     "metrics": mt})
    (DATA / f"chain-{name}.json").write_text(json.dumps(
        {"command": build_command(name), "created": m.created, "code_version": m.code_version,
         "data": m.recipe.get("data"), "prune": m.recipe.get("prune"), "anchors": rows}, indent=1) + "\n")
    domains = list((m.anchors[0].metrics or {}).get("heldout_loss_by_domain", {}))
    out = [f"`{build_command(name).split('=1 ', 1)[1]}` (built {m.created}, cbd {m.code_version}):", "",
           "| anchor | L x d | heads / kv | FFN | non-embedding params | start (pruned) | held-out mean | "
           + " | ".join(domains) + " | repair of the start (validation: plain -> repaired) | wall time |",
           "|---|---|---|---|---|---|---|" + "---|" * len(domains) + "---|---|"]
    for r in rows:
        L, d, h, g, _, f = r["shape"]
        mt = r["metrics"]
        rep = mt.get("repair")
        if not rep:
            rs = "—"
        elif rep.get("kept"):
            rs = f"{rep['check_loss_plain']:.3f} -> {rep['check_loss_by_ridge'][str(rep['ridge'])]:.3f} (ridge {rep['ridge']})"
        else:
            rs = f"not kept: {rep['check_loss_plain']:.3f} plain, best refit {min(rep['check_loss_by_ridge'].values()):.3f}"
        by = mt.get("heldout_loss_by_domain", {})
        out.append(f"| {r['name']} | {L} x {d} | {h} / {g} | {f} | {r['non_embedding_params']:,} | "
                   f"{mt.get('heldout_loss_pruned', '—')} | {mt.get('heldout_loss_mean', mt.get('heldout_loss'))} | "
                   + " | ".join(str(by.get(x, "")) for x in domains) + f" | {rs} | {mt.get('wall_s')} s |")
    return "\n".join(out)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["default"]:
        print(table(name) + "\n")
