"""The web page, /docs and /redoc in a real browser (Debian's chromium driven by Playwright) against the
real service: uvicorn and a worker as separate processes, a real Redis, the random test chain.

Nothing outside the service may be requested (every other URL is refused and counted); the page's
chain table and plot read without JavaScript; the form shows the API's own messages; a good shape runs
to a finished job whose download link serves the file, with API keys off and on.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import httpx
import pytest
from conftest_service import children, module_artifacts, redis_db, redis_server

from cbd.core.manifest import load_manifest, write_manifest

CHROMIUM = Path(os.environ.get("CBD_CHROMIUM", "/usr/bin/chromium"))
DB = 5
KEY = "ui-test-key-123"
LOSSES = {"a0": 3.9, "a1": 4.4, "a2": 5.1}  # held-out losses the chain build would have measured

if not CHROMIUM.exists():  # `make test` installs it (scripts/ensure-chromium.sh): in CI a missing one fails
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or scripts/ensure-chromium.sh)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def chains_root(random_chain, cbd_home, tmp_path_factory) -> Path:
    """A copy of the random test chain whose manifest carries held-out losses (the plot's y axis)."""
    root = tmp_path_factory.mktemp("ui_chains")
    shutil.copytree(cbd_home / "chains" / random_chain.name, root / random_chain.name)
    m = load_manifest(random_chain.name, root)
    anchors = [a.model_copy(update={"metrics": {**a.metrics, "heldout_loss": LOSSES[a.name]}}) for a in m.anchors]
    write_manifest(m.model_copy(update={"anchors": anchors}), root)
    return root


@pytest.fixture(scope="module")
def services(redis_server, module_artifacts, children, chains_root) -> dict[str, str]:
    """{"open": base URL, "keys": base URL of an API requiring X-API-Key}, one worker for both."""
    url = redis_db(redis_server, DB)
    env = {"CBD_CHAINS": str(chains_root), "CBD_DEFAULT_CHAIN": "test"}
    children.worker(url, **env)
    open_base, _ = children.api(url, CBD_SYNC_WAIT_S="30", **env)
    keys_base, _ = children.api(url, CBD_SYNC_WAIT_S="30", CBD_API_KEYS=KEY, **env)
    return {"open": open_base, "keys": keys_base}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


class Watched:
    """A page whose console errors, page errors, failed requests and requests off the service are kept."""

    def __init__(self, browser, base: str, **context) -> None:
        self.base = base
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.errors.append(f"{r.status}: {r.url}"))
        self.page.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(self.base) or url.startswith(("blob:", "data:")):
            route.continue_()
        else:  # an internal network reaches nothing else
            self.outside.append(url)
            route.abort()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser, services):
    pages: list[Watched] = []

    def make(base: str | None = None, **context) -> Watched:
        pages.append(Watched(browser, base or services["open"], **context))
        return pages[-1]

    yield make
    for w in pages:
        w.close()


def operations(base: str) -> list[str]:
    spec = httpx.get(base + "/openapi.json").json()
    return [o["operationId"] for item in spec["paths"].values() for o in item.values()]


@pytest.mark.parametrize("keys", ["open", "keys"])
def test_page_docs_and_redoc_load_offline_without_errors(watched, services, keys):
    base = services[keys]  # with CBD_API_KEYS too: nothing the page, /docs or /redoc load needs a key
    w = watched(base)
    page = w.page
    page.goto(base + "/")
    page.wait_for_selector("#plan-body dl")  # the script ran and POST /plan answered
    assert page.locator("svg.plot circle").count() == len(LOSSES)
    box = page.locator("svg.plot").bounding_box()
    assert box is not None and box["width"] > 200 and box["height"] > 80
    assert page.locator("svg.plot .target line").count() == 1  # the planned target is drawn on the plot
    assert {page.get_attribute(f'nav a[href="{h}"]', "href") for h in ("/docs", "/redoc")} == {"/docs", "/redoc"}

    page.goto(base + "/docs")
    page.wait_for_selector(".opblock")
    ops = operations(base)
    assert page.locator(".opblock").count() == len(ops)  # Swagger UI shows every operation
    assert page.locator('.cbd-nav a[href="/"]').count() == 1 and page.locator('.cbd-nav a[href="/redoc"]').count() == 1

    page.goto(base + "/redoc")
    page.wait_for_selector("[data-section-id^='operation/']")
    shown = {s.removeprefix("operation/") for s in page.eval_on_selector_all(
        "[data-section-id^='operation/']", "els => els.map(e => e.getAttribute('data-section-id'))")}
    assert shown == set(ops)
    assert page.locator('.cbd-nav a[href="/docs"]').count() == 1
    page.wait_for_load_state("networkidle")
    assert w.errors == [] and w.outside == [], (w.errors, w.outside)


def test_chain_table_and_plot_read_without_javascript(watched, services, chains_root):
    w = watched(java_script_enabled=False)
    page = w.page
    page.goto(services["open"] + "/")
    m = load_manifest("test", chains_root)
    rows = page.locator("article.chain tbody tr")
    assert rows.count() == len(m.anchors)
    for i, a in enumerate(m.anchors):
        cells = rows.nth(i).locator("th, td").all_inner_texts()
        assert cells[0] == a.name and f"{LOSSES[a.name]:.3f}" in cells
        assert f"{a.non_embedding_params:,}" in cells and str(a.spec.num_hidden_layers) in cells
    assert page.locator("svg.plot circle").count() == len(m.anchors)
    assert page.locator("svg.plot rect.band").count() == 1  # the interpolated range
    assert page.locator("noscript").count() == 1
    assert w.errors == [] and w.outside == []


def fill_shape(page, layers: int, hidden: int, heads: int, kv: int | str, ffn: int | str) -> None:
    for sel, value in (("#f-layers", layers), ("#f-hidden", hidden), ("#f-heads", heads), ("#f-kv", kv),
                       ("#f-ffn", ffn)):
        page.fill(sel, str(value))


def test_bad_shapes_show_the_apis_message(watched, services):
    base = services["open"]
    page = watched().page
    page.goto(base + "/")
    page.wait_for_selector("#plan-body dl")
    # A shape the library refuses: the message of cbd's ShapeError, as /plan words it.
    fill_shape(page, 3, 50, 3, 1, 64)
    body = {"architecture": {"num_hidden_layers": 3, "hidden_size": 50, "num_attention_heads": 3,
                             "num_key_value_heads": 1, "intermediate_size": 64}}
    api = httpx.post(base + "/plan", json=body)
    assert api.status_code == 422
    page.wait_for_selector("#plan-error:not([hidden])")
    page.wait_for_function("m => document.querySelector('#plan-error').textContent.includes(m)",
                           arg=api.json()["message"])
    # A value pydantic refuses: FastAPI's detail message, and the field marked invalid.
    page.fill("#f-layers", "0")
    body["architecture"] |= {"num_hidden_layers": 0, "hidden_size": 48}
    page.fill("#f-hidden", "48")
    detail = httpx.post(base + "/plan", json=body).json()["detail"][0]
    page.wait_for_function("m => document.querySelector('#plan-error').textContent.includes(m)", arg=detail["msg"])
    assert page.get_attribute("#f-layers", "aria-invalid") == "true"
    # Fixed: the error goes, the plan comes back.
    page.fill("#f-layers", "3")
    page.wait_for_selector("#plan-error", state="hidden")
    page.wait_for_selector("#plan-body dl")


@pytest.mark.parametrize("keys", ["open", "keys"])
def test_a_good_shape_runs_to_a_finished_job_whose_link_serves_the_file(watched, services, keys):
    base = services[keys]
    page = watched(base).page
    page.goto(base + "/")
    page.wait_for_selector("#plan-body dl")
    ffn = {"open": 48, "keys": 56}[keys]  # a shape per test: neither is answered from the other's cache
    fill_shape(page, 3, 48, 3, 1, ffn)
    body = {"architecture": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 3,
                             "num_key_value_heads": 1, "intermediate_size": ffn}}
    plan = httpx.post(base + "/plan", json=body).json()
    assert plan["job"] == "fast" and not plan["cached"]
    page.wait_for_function("id => document.querySelector('#plan-body').textContent.includes(id)", arg=plan["id"])
    if keys == "keys":  # no key: the API's 401 message, then the key, kept in sessionStorage only
        page.click("#submit")
        page.wait_for_function("() => document.querySelector('#job-error').textContent.includes('X-API-Key')")
        page.fill("#f-key", KEY)
        assert page.evaluate("k => [sessionStorage.getItem(k), localStorage.getItem(k)]", "cbd-api-key") == [KEY, None]
    page.focus("#submit")  # keyboard only: the form's button, Enter
    page.keyboard.press("Enter")
    link = page.locator('.files a[download="model.safetensors"]')
    link.wait_for(timeout=120_000)
    assert page.get_attribute("#job-progress", "value") == "1"
    row = page.locator(".files tbody tr", has=page.locator('a[download="model.safetensors"]'))
    shown_sha = row.locator("code").inner_text()
    href = link.get_attribute("href")
    data = page.request.get(href).body()  # as the browser downloads it (with its cookies, none needed)
    assert hashlib.sha256(data).hexdigest() == shown_sha
    assert f"{len(data):,} B" in row.inner_text()
    # the init card shows the numbers of the API's own answer
    job_id = href.split("/checkpoints/")[1].split("/")[0]
    answer = httpx.get(f"{base}/jobs/{job_id}", headers={"X-API-Key": KEY} if keys == "keys" else {})
    assert answer.status_code == 200 and answer.json()["status"] == "finished", answer.text
    card = answer.json()["card"]
    assert card and {"step0_loss", "random_init_loss", "best_single_anchor", "single_anchors"} <= card.keys()
    shown = page.locator("#init-card")
    assert "step-0 loss (nats/token)" in shown.locator("caption").inner_text()
    assert shown.locator("tr.this td.loss").inner_text() == f"{card['step0_loss']:.4f}"
    assert shown.locator("tr.random td.loss").inner_text() == f"{card['random_init_loss']:.4f}"
    best = card["best_single_anchor"]
    assert best["anchor"] in shown.locator("tr.best th").inner_text()
    assert shown.locator("tr.best td.loss").inner_text() == f"{best['loss']:.4f}"
    singles = shown.locator("tr.single")
    assert singles.count() == len(card["single_anchors"])
    rows = zip(singles.locator("th").all_inner_texts(), singles.locator("td.loss").all_inner_texts(), strict=True)
    role = {"small": "smaller", "big": "bigger"}
    assert sorted(rows) == sorted((f"{a['anchor']} alone ({role[t]} anchor, alpha {a['alpha']:g})", f"{a['loss']:.4f}")
                                  for t, a in card["single_anchors"].items())
    facts = page.locator(".init-card dl").inner_text()
    gain = card["gain_over_best_single_anchor"]
    assert (f"{abs(gain):.4f} nats/token" if gain else "the same loss as") in facts
    assert card["alpha_scheme"] + ":" in facts and card["repair"] + ":" in facts
    assert page.locator(".init-card").evaluate("e => getComputedStyle(e).display") != "none"
    header = len(data) - plan["weights_bytes"]  # the plan's size is the weights' bytes; the header adds a little
    assert 0 < header < 64 * 1024, (len(data), plan["weights_bytes"])
    # the snippets name this request
    snippets = page.locator(".snippet pre").all_inner_texts()
    assert any(f"--ffn {ffn}" in s and "cbd fetch" in s for s in snippets)
    assert any("from_pretrained" in s for s in snippets)
    assert any('"intermediate_size":' + str(ffn) in s and "curl" in s for s in snippets)
    # and the recent jobs table lists it as finished
    page.wait_for_function("id => [...document.querySelectorAll('#jobs tbody tr')].some(r => "
                           "r.querySelector('a') && r.querySelector('a').href.endsWith(id) && "
                           "r.textContent.includes('finished'))", arg=job_id)
    assert job_id == plan["id"]


def test_the_card_box_unchecked_asks_for_no_card(watched, services):
    """Unchecking "Init card" sends ``"card": false``: the job finishes without a card, the page says it
    was not measured, and the snippets repeat the whole body (``cbd fetch --spec``)."""
    base = services["open"]
    page = watched(base).page
    page.goto(base + "/")
    page.wait_for_selector("#plan-body dl")
    fill_shape(page, 3, 48, 3, 1, 40)
    assert page.is_checked("#f-card")  # measured unless the user says otherwise
    page.uncheck("#f-card")
    page.click("#submit")
    link = page.locator('.files a[download="model.safetensors"]')
    link.wait_for(timeout=120_000)
    job_id = link.get_attribute("href").split("/checkpoints/")[1].split("/")[0]
    answer = httpx.get(f"{base}/jobs/{job_id}").json()
    assert answer["status"] == "finished" and answer.get("card") is None  # (a null is left out)
    assert "not measured" in page.locator("#no-card").inner_text() and page.locator("#init-card").count() == 0
    snippets = page.locator(".snippet pre").all_inner_texts()
    assert any('"card":false' in s and "cbd fetch --spec" in s for s in snippets)
    body = {"architecture": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 3,
                             "num_key_value_heads": 1, "intermediate_size": 40}}
    assert httpx.post(base + "/plan", json=body | {"card": False}).json()["id"] == job_id  # the body it sent
    assert httpx.post(base + "/plan", json=body).json()["id"] != job_id


def test_plan_enqueues_nothing_and_says_what_initialize_would_do(services):
    base = services["keys"]  # no key needed: it changes nothing
    before = httpx.get(base + "/jobs").json()["jobs"]
    body = {"architecture": {"num_hidden_layers": 4, "hidden_size": 32, "num_attention_heads": 2}, "dtype": "bfloat16"}
    r = httpx.post(base + "/plan", json=body)
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["small"]["name"] == "a2" and p["big"]["name"] == "a1" and 0 < p["alpha"] < 1
    assert p["small"]["heldout_loss"] == LOSSES["a2"] and p["alpha_source"] == "calibrate"
    assert p["weights_bytes"] == 2 * p["num_params"] and p["job"] == "fast" and p["cached"] is False
    assert httpx.get(base + "/jobs").json()["jobs"] == before
    assert httpx.get(f"{base}/jobs/{p['id']}").status_code == 404
    # a chain that has a recipe but is not built: POST /initialize would build it; /plan builds nothing
    r = httpx.post(base + "/plan", json=body | {"chain": "tiny"})
    assert r.status_code == 409 and r.json()["error"] == "ChainNotBuiltError", r.text
    assert httpx.get(base + "/jobs/chain-tiny").status_code == 404


def test_caching_headers_and_no_outside_urls(services):
    base = services["open"]
    page = httpx.get(base + "/")
    assert page.headers["cache-control"] == "no-cache" and page.headers["etag"]
    assert "script-src 'self'" in page.headers["content-security-policy"]  # no inline or foreign script runs
    assert httpx.get(base + "/", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
    assets = [a for a in page.text.split('"') if a.startswith("/ui/app.")]
    assert len(assets) == 2 and all("?v=" in a for a in assets)
    for a in assets:
        r = httpx.get(base + a)
        assert r.status_code == 200 and "immutable" in r.headers["cache-control"] and r.headers["etag"]
        assert httpx.get(base + a, headers={"If-None-Match": r.headers["etag"]}).status_code == 304
    for path in ("/", "/docs", "/redoc"):
        text = httpx.get(base + path).text
        assert "https://" not in text and "http://" not in text.replace("http://www.w3.org", ""), path
    assert b"cdn.redoc.ly" not in httpx.get(base + "/ui/vendor/redoc.standalone.js").content  # its one CDN image
