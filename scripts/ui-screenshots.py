"""Retake docs/ui-desktop.png and docs/ui-narrow.png: the web page after a finished request (the init card shown).

Starts ``cbd serve`` from this checkout on a free port (embedded Redis and one worker in a scratch
CBD_HOME, the built chains of this host, a scratch artifact store so the init is made, not found), drives
Debian's chromium with Playwright through the form (keyboard and clicks, as a person would), waits for the
finished job and its init card, and saves a full-page shot 1280 px wide and one 390 px wide (down to the end
of the init card). The PNGs are reduced to 256 colours (``pngquant`` when installed, else Pillow).

    PYTHONPATH=$PWD .venv/bin/python scripts/ui-screenshots.py            # chain tiny, shape 6x128 2/1 384
    PYTHONPATH=$PWD .venv/bin/python scripts/ui-screenshots.py --chain tiny --shape 6,128,2,1,384 --out docs

It never builds a chain: a chain that is not built (no manifest.json) is an error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CBD_CHROMIUM", "/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reduce_png(path: Path) -> None:
    """256 colours: pngquant when installed (better), else Pillow's median cut."""
    if shutil.which("pngquant"):
        subprocess.run(["pngquant", "--force", "--skip-if-larger", "--strip", "--output", str(path), "256", str(path)],
                       check=False)
        return
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"cbd serve exited with {proc.returncode}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{base}/healthz did not answer 200 within {timeout:.0f} s")


def shoot(base: str, chain: str, shape: list[int], out: Path, timeout_s: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        page.wait_for_selector("#plan-body dl")
        page.select_option("#f-chain", chain)
        for sel, value in zip(("#f-layers", "#f-hidden", "#f-heads", "#f-kv", "#f-ffn"), shape, strict=True):
            page.fill(sel, str(value))
        body = {"chain": chain, "architecture": dict(zip(
            ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size"),
            shape, strict=True))}
        plan = httpx.post(base + "/plan", json=body, timeout=30)
        if plan.status_code != 200:
            raise SystemExit(f"POST /plan answered {plan.status_code}: {plan.text}")
        page.wait_for_function("id => document.querySelector('#plan-body').textContent.includes(id)",
                               arg=plan.json()["id"])
        page.focus("#submit")
        page.keyboard.press("Enter")
        page.wait_for_selector("#init-card", timeout=timeout_s * 1000)
        page.wait_for_function("() => [...document.querySelectorAll('#jobs tbody tr')].some(r => "
                               "r.textContent.includes('finished'))", timeout=30_000)
        page.evaluate("() => document.activeElement && document.activeElement.blur()")
        if errors:
            raise SystemExit(f"the page logged errors: {errors}")
        desktop = out / "ui-desktop.png"
        page.screenshot(path=str(desktop), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        narrow = out / "ui-narrow.png"
        height = page.evaluate("() => document.documentElement.scrollHeight")
        card_end = page.evaluate("() => document.querySelector('.init-card').getBoundingClientRect().bottom + scrollY")
        bottom = min(height, int(card_end) + 16)
        page.screenshot(path=str(narrow), full_page=True, clip={"x": 0, "y": 0, "width": 390, "height": bottom})
        browser.close()
    for path in (desktop, narrow):
        reduce_png(path)
        print(f"{path}: {path.stat().st_size:,} bytes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chain", default="tiny")
    ap.add_argument("--shape", default="6,128,2,1,384", help="layers,hidden,heads,kv heads,FFN")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the finished job")
    args = ap.parse_args()
    shape = [int(x) for x in args.shape.split(",")]
    if len(shape) != 5:
        ap.error("--shape takes five numbers: layers,hidden,heads,kv heads,FFN")

    sys.path.insert(0, str(REPO))
    from cbd.core import paths

    chains, assets = paths.chains_dir(), paths.assets_dir()
    if not (chains / args.chain / "manifest.json").is_file():
        print(f"error: chain {args.chain!r} is not built in {chains} (cbd chain build {args.chain})", file=sys.stderr)
        return 3
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="cbd-shots-") as scratch:
        env = os.environ | {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "CBD_HOME": scratch, "CBD_CHAINS": str(chains), "CBD_ASSETS": str(assets),
            "CBD_ARTIFACTS": str(Path(scratch) / "artifacts"), "CBD_DEFAULT_CHAIN": args.chain,
        }
        env.pop("REDIS_URL", None)
        env.pop("CBD_STORE_URL", None)
        env.pop("CBD_API_KEYS", None)
        log = Path(scratch) / "serve.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "cbd.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(base, proc)
            shoot(base, args.chain, shape, args.out, args.timeout)
        except BaseException:
            sys.stderr.write(log.read_text(errors="replace")[-4000:])  # what the service said last
            raise
        finally:
            proc.send_signal(signal.SIGTERM)  # cbd serve stops the API, the worker, then Redis
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
