"""The web page for people (``GET /``, assets under ``/ui/``) and the API docs that work offline.

``GET /`` is rendered here, torch-free, from the chain manifests: the chain tables and their plots
(hand-written SVG) read without JavaScript; ``/ui/app.js`` adds the request form (validated by
``POST /plan`` as the user types), the job's live progress, downloads and snippets, and the table of
recent jobs. Nothing is loaded from outside the service: Swagger UI (``/docs``) and ReDoc (``/redoc``)
get their scripts from the ``fastapi-offline`` package, served under ``/ui/vendor/``.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from app import schemas
from app.core.config import Settings
from app.routes.chains import chains_view

router = APIRouter(include_in_schema=False)
ASSETS = Path(__file__).resolve().parent.parent / "ui"
VENDOR = Path(str(files("fastapi_offline") / "static"))
VENDOR_VERSION = version("fastapi-offline")  # the vendored files change only with the package
IMMUTABLE = "public, max-age=31536000, immutable"  # an asset asked for by its content hash (?v=)
SHORT = "public, max-age=300"
PAGE_CACHE = "no-cache"  # the page lists chains, which change: revalidate (ETag) every time
# The page runs only its own script and styles (no inline script, nothing from elsewhere).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
NAV = ('<nav class="cbd-nav" aria-label="cbd pages" style="font:14px system-ui,sans-serif;padding:6px 12px;'
       'background:#1d3557"><a style="color:#fff;margin-right:1em" href="/">cbd home page</a>'
       '<a style="color:#fff;margin-right:1em" href="/docs">Swagger UI</a>'
       '<a style="color:#fff;margin-right:1em" href="/redoc">ReDoc</a>'
       '<a style="color:#fff" href="/openapi.json">openapi.json</a></nav>')


class CachedStatic(StaticFiles):
    """StaticFiles (ETag, Last-Modified, 304) with a Cache-Control header: immutable for a URL that
    carries the content hash (``?v=``), a few minutes otherwise."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if response.status_code in (200, 304):
            versioned = b"v=" in scope.get("query_string", b"")
            response.headers["Cache-Control"] = IMMUTABLE if versioned else SHORT
        return response


def asset_version(name: str) -> str:
    return hashlib.sha256((ASSETS / name).read_bytes()).hexdigest()[:12]


def install(app: FastAPI) -> None:
    """The routes of ``router``, then the page's assets and the vendored docs assets."""
    app.state.ui_versions = {n: asset_version(n) for n in ("app.js", "app.css")}
    app.include_router(router)
    app.mount("/ui/vendor", CachedStatic(directory=VENDOR), name="ui-vendor")
    app.mount("/ui", CachedStatic(directory=ASSETS), name="ui")


# ReDoc's footer shows Redocly's logo from their CDN: on a network without internet that is a failed
# request (and a console error) on every visit, so the script is served with the logo pointed here.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
_redoc_js: tuple[bytes, str] | None = None


def redoc_js() -> tuple[bytes, str]:
    global _redoc_js
    if _redoc_js is None:
        data = (VENDOR / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO.encode(), b"/ui/vendor/favicon.png")
        _redoc_js = data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    return _redoc_js


@router.get("/ui/vendor/redoc.standalone.js")
async def redoc_script(request: Request) -> Response:
    data, etag = await run_in_threadpool(redoc_js)
    headers = {"ETag": etag, "Cache-Control": IMMUTABLE if "v" in request.query_params else SHORT}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="text/javascript; charset=utf-8", headers=headers)


def cached_html(request: Request, body: str, *, csp: str | None = None) -> Response:
    """HTML with a strong ETag; ``If-None-Match`` answers 304."""
    data = body.encode()
    etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": PAGE_CACHE, "X-Content-Type-Options": "nosniff"}
    if csp:
        headers["Content-Security-Policy"] = csp
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return HTMLResponse(data, headers=headers)


@router.get("/docs")
async def swagger(request: Request) -> Response:
    page = get_swagger_ui_html(openapi_url="/openapi.json", title="cbd - Swagger UI",
                               swagger_js_url=f"/ui/vendor/swagger-ui-bundle.js?v={VENDOR_VERSION}",
                               swagger_css_url=f"/ui/vendor/swagger-ui.css?v={VENDOR_VERSION}",
                               swagger_favicon_url="/ui/vendor/favicon.png",
                               swagger_ui_parameters={"validatorUrl": None})  # no call to the public validator
    return cached_html(request, _with_nav(page.body.decode()))


@router.get("/redoc")
async def redoc(request: Request) -> Response:
    page = get_redoc_html(openapi_url="/openapi.json", title="cbd - ReDoc",
                          redoc_js_url=f"/ui/vendor/redoc.standalone.js?v={VENDOR_VERSION}",
                          redoc_favicon_url="/ui/vendor/favicon.png", with_google_fonts=False)
    return cached_html(request, _with_nav(page.body.decode()))


def _with_nav(page: str) -> str:
    return page.replace("<body>", "<body>\n" + NAV, 1)


@router.get("/")
async def index(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    chains = await run_in_threadpool(chains_view, settings, settings.chains_of(None) if settings.keyed else None)
    return cached_html(request, render_page(chains, request.app.state.ui_versions), csp=PAGE_CSP)


# ---------------------------------------------------------------------------------------------- page

def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def human(n: float) -> str:
    """12,345,678 -> 12.3M (the tables also carry the exact number)."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def shape_of(spec: dict) -> tuple[int, int, int, int, int]:
    return (spec["num_hidden_layers"], spec["hidden_size"], spec["num_attention_heads"],
            spec.get("num_key_value_heads") or spec["num_attention_heads"], spec.get("intermediate_size") or 0)


def render_page(chains: schemas.ChainsResponse, versions: dict[str, str]) -> str:
    default = next((c.name for c in chains.chains if c.name == chains.default_chain),
                   chains.chains[0].name if chains.chains else None)
    tables = "\n".join(chain_section(c, c.name == default) for c in chains.chains) or (
        "<p>No chain is built yet. <code>cbd chain build tiny</code> builds one (a few minutes), or a request "
        f"to <code>POST /initialize</code> builds the default chain from its recipe. Recipes: "
        f"{esc(', '.join(chains.recipes) or 'none')}.</p>")
    data = {"default_chain": default, "tokenizers": chains.tokenizers,
            "chains": [{"name": c.name, "tokenizer": c.tokenizer, "head_dim": c.servable.head_dim,
                        "anchors": [{"name": a.name, "shape": shape_of(a.spec)} for a in c.anchors]}
                       for c in chains.chains]}
    blob = json.dumps(data).replace("<", "\\u003c")
    chain_options = "".join(f'<option value="{esc(c.name)}"{" selected" if c.name == default else ""}>'
                            f"{esc(c.name)}</option>" for c in chains.chains)
    tok_options = "".join(f'<option value="{esc(t)}">{esc(t)} (bridge: a slow job)</option>' for t in chains.tokenizers)
    start = _start_shape(chains, default)
    return PAGE.format(
        css=f"/ui/app.css?v={versions['app.css']}", js=f"/ui/app.js?v={versions['app.js']}", tables=tables,
        data=blob, chain_options=chain_options, tok_options=tok_options,
        layers=start[0], hidden=start[1], heads=start[2], kv=start[3], ffn=start[4])


def _start_shape(chains: schemas.ChainsResponse, default: str | None) -> tuple[int, ...]:
    """The form starts from a shape between the default chain's two smallest anchors (or its only one)."""
    chain = next((c for c in chains.chains if c.name == default), None)
    if chain is None:
        return (4, 256, 4, 2, 512)
    ordered = sorted(chain.anchors, key=lambda a: a.non_embedding_params)
    small = shape_of(ordered[0].spec)
    if len(ordered) == 1:
        return small
    big = shape_of(ordered[1].spec)
    return (big[0],) + small[1:]  # the bigger one's depth, the smaller one's width: between the two


def chain_section(c: schemas.ChainInfo, is_default: bool) -> str:
    s = c.servable
    rows = []
    for a in c.anchors:
        layers, hidden, heads, kv, ffn = shape_of(a.spec)
        loss = f"{a.heldout_loss:.3f}" if a.heldout_loss is not None else "not measured"
        rows.append(f"<tr><th scope=\"row\">{esc(a.name)}</th><td>{layers}</td><td>{hidden}</td><td>{heads}/{kv}</td>"
                    f"<td>{ffn}</td><td data-n=\"{a.num_params}\">{a.num_params:,}</td>"
                    f"<td data-n=\"{a.non_embedding_params}\">{a.non_embedding_params:,}</td><td>{loss}</td>"
                    f"<td>{esc(a.parent or 'source')}</td></tr>")
    default = " (default)" if is_default else ""
    return f"""<article class="chain" id="chain-{esc(c.name)}" aria-labelledby="chain-{esc(c.name)}-h">
<h3 id="chain-{esc(c.name)}-h">Chain <code>{esc(c.name)}</code>{default}</h3>
<p>Source <code>{esc(c.source)}</code>, tokenizer <code>{esc(c.tokenizer)}</code>, family {esc(s.family)}
({esc(s.model_type)}), vocabulary {s.vocab_size:,}, head dim {s.head_dim} (so <code>hidden_size</code> =
heads &times; {s.head_dim}).</p>
<p>Servable: interpolated between {s.min_non_embedding_params_interpolated:,} and
{s.max_non_embedding_params_interpolated:,} non-embedding parameters; below, a subset of the smallest anchor;
above, the largest anchor grown, up to {s.max_non_embedding_params:,}.</p>
<div class="scroll"><table>
<caption>Anchors of <code>{esc(c.name)}</code>, largest first</caption>
<thead><tr><th scope="col">anchor</th><th scope="col">layers</th><th scope="col">hidden</th>
<th scope="col">heads/kv</th><th scope="col">FFN</th><th scope="col">parameters</th>
<th scope="col">non-embedding</th><th scope="col">held-out loss (nats/token)</th><th scope="col">pruned from</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></div>
<figure>{plot(c)}
<figcaption>Held-out loss against non-embedding parameters (log scale) for the anchors of
<code>{esc(c.name)}</code>; the dark band is the interpolated range, the light bands the extrapolated
ones (subset below, grown above).</figcaption></figure>
</article>"""


W, H = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 44


def plot(c: schemas.ChainInfo) -> str:
    """Loss against log10(non-embedding parameters), with the servable range as bands; the
    page's script draws the planned target on it (data-* attributes carry the scale)."""
    s = c.servable
    sizes = [a.non_embedding_params for a in c.anchors]
    lo = math.log10(max(1, min(sizes)) / 3)
    hi = math.log10(max(s.max_non_embedding_params, max(sizes)) * 1.15)
    losses = [a.heldout_loss for a in c.anchors if a.heldout_loss is not None]
    if losses:
        ylo, yhi = min(losses), max(losses)
        pad = max(0.1, (yhi - ylo) * 0.15)
        ylo, yhi = ylo - pad, yhi + pad
    else:
        ylo, yhi = 0.0, 1.0

    def x(n: float) -> float:
        return LEFT + (math.log10(max(n, 1)) - lo) / (hi - lo) * (W - LEFT - RIGHT)

    def y(v: float) -> float:
        return TOP + (yhi - v) / (yhi - ylo) * (H - TOP - BOTTOM)

    base = H - BOTTOM
    x0, x1 = x(s.min_non_embedding_params_interpolated), x(s.max_non_embedding_params_interpolated)
    xmax = x(s.max_non_embedding_params)
    parts = [
        f'<rect class="band-x" x="{LEFT}" y="{TOP}" width="{x0 - LEFT:.1f}" height="{base - TOP}"><title>subset of the '
        f"smallest anchor</title></rect>",
        f'<rect class="band-x" x="{x1:.1f}" y="{TOP}" width="{xmax - x1:.1f}" height="{base - TOP}"><title>the largest '
        f"anchor grown (up to {s.max_non_embedding_params:,})</title></rect>",
        f'<rect class="band" x="{x0:.1f}" y="{TOP}" width="{x1 - x0:.1f}" height="{base - TOP}"><title>interpolated: '
        f"{s.min_non_embedding_params_interpolated:,} to {s.max_non_embedding_params_interpolated:,}</title></rect>",
        f'<line class="axis" x1="{LEFT}" y1="{base}" x2="{W - RIGHT}" y2="{base}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}"/>',
    ]
    for k in range(math.ceil(lo), math.floor(hi) + 1):
        px = x(10 ** k)
        parts.append(f'<line class="tick" x1="{px:.1f}" y1="{base}" x2="{px:.1f}" y2="{base + 5}"/>'
                     f'<text class="lab" x="{px:.1f}" y="{base + 18}" text-anchor="middle">{human(10 ** k)}</text>')
    parts.append(f'<text class="lab" x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">non-embedding '
                 "parameters</text>")
    if losses:
        for i in range(5):
            v = ylo + (yhi - ylo) * i / 4
            parts.append(f'<text class="lab" x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
        parts.append(f'<text class="lab" transform="translate(12 {(TOP + base) / 2}) rotate(-90)" '
                     'text-anchor="middle">held-out loss</text>')
    else:
        parts.append(f'<text class="lab" x="{(LEFT + W - RIGHT) / 2}" y="{TOP + 16}" text-anchor="middle">'
                     "no held-out loss measured for this chain: anchors on the axis</text>")
    pts = sorted((a.non_embedding_params, a.heldout_loss, a.name) for a in c.anchors if a.heldout_loss is not None)
    if len(pts) > 1:
        parts.append('<polyline class="curve" points="' + " ".join(f"{x(n):.1f},{y(v):.1f}" for n, v, _ in pts) + '"/>')
    for a in c.anchors:
        px = x(a.non_embedding_params)
        py = y(a.heldout_loss) if a.heldout_loss is not None else base
        loss = f", held-out loss {a.heldout_loss:.3f}" if a.heldout_loss is not None else ""
        parts.append(f'<g class="anchor"><circle cx="{px:.1f}" cy="{py:.1f}" r="5"><title>{esc(a.name)}: '
                     f"{a.non_embedding_params:,} non-embedding parameters{loss}</title></circle>"
                     f'<text class="lab" x="{px + 7:.1f}" y="{py - 7:.1f}">{esc(a.name)}</text></g>')
    title = f"plot-{esc(c.name)}"
    return (f'<svg class="plot" viewBox="0 0 {W} {H}" role="img" aria-labelledby="{title}-t" '
            f'data-chain="{esc(c.name)}" data-lo="{lo:.6f}" data-hi="{hi:.6f}" data-left="{LEFT}" '
            f'data-right="{W - RIGHT}" data-top="{TOP}" data-base="{base}">'
            f'<title id="{title}-t">Held-out loss of the anchors of {esc(c.name)} against their non-embedding '
            f"parameters, with the servable range</title>{''.join(parts)}</svg>")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cbd: initialisations for small language models</title>
<link rel="icon" href="/ui/vendor/favicon.png">
<link rel="stylesheet" href="{css}">
<script src="{js}" defer></script>
</head>
<body>
<a class="skip" href="#request">Skip to the request form</a>
<header>
<h1>cbd: initialisations for small language models of any size</h1>
<p>Each init is interpolated from the two anchors of a distilled chain around the shape you ask for.</p>
<nav aria-label="cbd pages"><ul>
<li><a href="/" aria-current="page">This page</a></li>
<li><a href="/docs">API docs (Swagger UI)</a></li>
<li><a href="/redoc">API reference (ReDoc)</a></li>
<li><a href="/openapi.json">openapi.json</a></li>
</ul></nav>
</header>
<main>
<section aria-labelledby="chains-h">
<h2 id="chains-h">Chains</h2>
{tables}
</section>

<section id="request" aria-labelledby="request-h">
<h2 id="request-h">Request an initialisation</h2>
<noscript><p>The form needs JavaScript. Without it, POST the same body with curl (see
<a href="/docs">the API docs</a>) or run <code>cbd fetch --layers L --hidden H --heads A --out ./init</code>.</p></noscript>
<form id="init-form" novalidate>
<fieldset>
<legend>Target shape</legend>
<div class="grid">
<label>Chain <select name="chain" id="f-chain">{chain_options}</select></label>
<label>Layers <input name="num_hidden_layers" id="f-layers" type="number" inputmode="numeric" value="{layers}" required></label>
<label>Hidden size <input name="hidden_size" id="f-hidden" type="number" inputmode="numeric" value="{hidden}" required></label>
<label>Attention heads <input name="num_attention_heads" id="f-heads" type="number" inputmode="numeric" value="{heads}" required></label>
<label>KV heads <input name="num_key_value_heads" id="f-kv" type="number" inputmode="numeric" value="{kv}" placeholder="chain's ratio"></label>
<label>FFN size <input name="intermediate_size" id="f-ffn" type="number" inputmode="numeric" value="{ffn}" placeholder="chain's ratio"></label>
<label>Tokenizer <select name="tokenizer" id="f-tokenizer"><option value="">the chain's own</option>{tok_options}</select></label>
<label>dtype <select name="dtype" id="f-dtype"><option>float32</option><option>bfloat16</option><option>float16</option></select></label>
</div>
</fieldset>
<fieldset>
<legend>Alpha (weight of the smaller anchor)</legend>
<label class="inline"><input type="radio" name="alpha_mode" value="calibrated" checked> calibrated (default: the best of a grid by validation loss)</label>
<label class="inline"><input type="radio" name="alpha_mode" value="alpha0"> alpha0 (relative log-parameter distance)</label>
<div class="inline"><label class="inline"><input type="radio" name="alpha_mode" value="alpha" id="f-alpha-mode">
this alpha:</label> <input name="alpha" id="f-alpha" type="number" step="0.01" value="0.5" aria-label="alpha (0 to 1)"></div>
</fieldset>
<fieldset>
<legend>Init card</legend>
<label class="inline"><input type="checkbox" name="card" id="f-card" value="1" checked> measure it: the init's
step-0 loss beside each single anchor's and a random init's (forward passes of the target, most of
a quick miss's time; off: the fastest miss, no card)</label>
</fieldset>
<fieldset>
<legend>API key</legend>
<label>X-API-Key <input name="api_key" id="f-key" type="password" autocomplete="off"
aria-describedby="key-help"></label>
<p id="key-help" class="help">Only needed when the service sets <code>CBD_API_KEYS</code>. Kept in this tab's
session storage only.</p>
</fieldset>
<div id="plan-error" class="error" role="alert" aria-live="assertive" hidden></div>
<section id="plan" aria-labelledby="plan-h" aria-live="polite">
<h3 id="plan-h">Plan</h3>
<div id="plan-body"><p>Checking the shape&hellip;</p></div>
</section>
<button type="submit" id="submit">Initialize</button>
</form>

<section id="job" aria-labelledby="job-h" hidden>
<h3 id="job-h">Job</h3>
<p id="job-status" aria-live="polite"></p>
<progress id="job-progress" max="1" value="0" aria-labelledby="job-h"></progress>
<div id="job-error" class="error" role="alert" hidden></div>
<div id="job-result"></div>
</section>
</section>

<section aria-labelledby="jobs-h">
<h2 id="jobs-h">Recent and running jobs</h2>
<div class="scroll"><table id="jobs">
<thead><tr><th scope="col">job</th><th scope="col">kind</th><th scope="col">target</th><th scope="col">chain</th>
<th scope="col">status</th><th scope="col">progress</th><th scope="col">enqueued</th></tr></thead>
<tbody><tr><td colspan="7">Loading (needs JavaScript; or <a href="/jobs">GET /jobs</a>)&hellip;</td></tr></tbody>
</table></div>
</section>
</main>
<footer><p><a href="/docs">Swagger UI</a> &middot; <a href="/redoc">ReDoc</a> &middot;
<a href="/chains">/chains</a> &middot; <a href="/healthz">/healthz</a> &middot; <a href="/metrics">/metrics</a></p></footer>
<script type="application/json" id="chains-data">{data}</script>
</body>
</html>
"""
