// cbd's web page: the request form (checked by POST /plan as you type), the job's progress,
// downloads and snippets, and the recent jobs. Plain ES2020, no dependencies, nothing from outside.
"use strict";
(() => {
  const $ = (sel, el = document) => el.querySelector(sel);
  const KEY = "cbd-api-key";
  const data = JSON.parse($("#chains-data").textContent);
  const form = $("#init-form");
  const keyInput = $("#f-key");
  const planBody = $("#plan-body");
  const planError = $("#plan-error");
  const submit = $("#submit");
  const origin = window.location.origin;
  let plan = null;
  let planSeq = 0;
  let timer = null;
  let following = null;

  keyInput.value = sessionStorage.getItem(KEY) || "";
  keyInput.addEventListener("input", () => {
    if (keyInput.value) sessionStorage.setItem(KEY, keyInput.value);
    else sessionStorage.removeItem(KEY);
  });

  const el = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k);
    return e;
  };
  const human = (n) => {
    for (const [d, u] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) if (Math.abs(n) >= d) return `${+(n / d).toPrecision(3)}${u}`;
    return String(n);
  };
  const bytes = (n) => {
    for (const [d, u] of [[2 ** 30, "GiB"], [2 ** 20, "MiB"], [2 ** 10, "KiB"]]) if (n >= d) return `${(n / d).toFixed(1)} ${u}`;
    return `${n} B`;
  };

  // The body POST /plan and POST /initialize get: exactly what the form says, nothing checked here.
  function requestBody() {
    const f = new FormData(form);
    const num = (name) => {
      const input = form.elements[name];
      const raw = (f.get(name) || "").trim();
      if (raw === "") return input.validity && input.validity.badInput ? "not a number" : undefined;
      return Number(raw);
    };
    const arch = {};
    for (const name of ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
      "intermediate_size"]) {
      const v = num(name);
      if (v !== undefined) arch[name] = v;
    }
    const body = { architecture: arch };
    if (f.get("chain")) body.chain = f.get("chain");
    if (f.get("tokenizer")) body.tokenizer = f.get("tokenizer");
    if (f.get("dtype") !== "float32") body.dtype = f.get("dtype");
    const mode = f.get("alpha_mode");
    if (mode === "alpha0") body.calibrate = false;
    if (!f.get("card")) body.card = false;
    if (mode === "alpha") {
      const a = num("alpha");
      body.alpha = a === undefined ? null : a;
    }
    return body;
  }

  function headers(json) {
    const h = json ? { "content-type": "application/json" } : {};
    if (keyInput.value) h["X-API-Key"] = keyInput.value;
    return h;
  }

  async function call(method, path, body) {
    let r;
    try {
      r = await fetch(path, { method, headers: headers(body !== undefined),
        body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      return { status: 0, json: { message: `the service did not answer (${e.message})` }, headers: new Headers() };
    }
    let json = null;
    const text = await r.text();
    try { json = JSON.parse(text); } catch (e) { json = { message: text || `HTTP ${r.status}` }; }
    return { status: r.status, json, headers: r.headers };
  }

  // The API's own words: FastAPI's {"detail": [...]} or cbd's {"error", "message", "allowed"}.
  function errorNodes(status, j) {
    const out = [];
    if (j && Array.isArray(j.detail)) {
      for (const d of j.detail) {
        const where = (d.loc || []).filter((x) => x !== "body").join(".");
        out.push(el("p", { text: `${where ? where + ": " : ""}${d.msg}` }));
      }
    } else if (j && j.message) {
      out.push(el("p", { text: `${j.error ? j.error + ": " : ""}${j.message}` }));
      if (j.allowed !== undefined && j.allowed !== null) {
        out.push(el("p", { class: "allowed", text: `Allowed: ${JSON.stringify(j.allowed)}` }));
      }
      if (j.cause && j.cause.message) out.push(el("p", { text: `${j.cause.type}: ${j.cause.message}` }));
    } else if (j && typeof j.detail === "string") {
      out.push(el("p", { text: j.detail }));
    } else {
      out.push(el("p", { text: `HTTP ${status}` }));
    }
    return out;
  }

  function markInvalid(j) {
    for (const input of form.querySelectorAll("input, select")) input.removeAttribute("aria-invalid");
    if (!j || !Array.isArray(j.detail)) return;
    for (const d of j.detail) {
      const name = (d.loc || []).filter((x) => x !== "body" && x !== "architecture").pop();
      if (form.elements[name] && form.elements[name].setAttribute) {
        form.elements[name].setAttribute("aria-invalid", "true");
        form.elements[name].setAttribute("aria-errormessage", "plan-error");
      }
    }
  }

  function showPlanError(status, j) {
    planError.replaceChildren(...errorNodes(status, j));
    planError.hidden = false;
    markInvalid(j);
  }

  async function checkPlan() {
    const seq = ++planSeq;
    const r = await call("POST", "/plan", requestBody());
    if (seq !== planSeq) return; // a later keystroke has asked again
    if (r.status !== 200) {
      plan = null;
      showPlanError(r.status, r.json);
      planBody.replaceChildren(el("p", { text: "No plan: fix the shape above." }));
      drawTarget(null);
      return;
    }
    plan = r.json;
    planError.hidden = true;
    markInvalid(null);
    renderPlan(plan);
    drawTarget(plan);
  }

  function anchorText(a) {
    if (!a) return "none";
    const loss = a.heldout_loss === null || a.heldout_loss === undefined ? "" : `, held-out loss ${a.heldout_loss}`;
    return `${a.name} (${a.shape}; ${a.non_embedding_params.toLocaleString()} non-embedding${loss})`;
  }

  function renderPlan(p) {
    const rows = [
      ["anchors", p.small && p.big && p.small.name === p.big.name ? `${anchorText(p.small)}: the target is this anchor`
        : `smaller ${anchorText(p.small)}; bigger ${anchorText(p.big)}`],
      ["alpha", `${p.alpha} (${p.alpha_source === "calibrate" ? "alpha0; calibration starts from it"
        : p.alpha_source === "distance" ? "alpha0, used as is" : p.alpha_source})`],
      ["parameters", p.num_params === undefined ? "set by the target tokenizer's vocabulary (bridge)"
        : `${p.num_params.toLocaleString()} (${human(p.num_params)})`],
      ["non-embedding parameters", `${p.non_embedding_params.toLocaleString()} (${human(p.non_embedding_params)})`],
      ["model.safetensors", p.weights_bytes === undefined ? "depends on the vocabulary"
        : `about ${bytes(p.weights_bytes)} (${p.dtype})`],
      ["job", p.cached ? "already made: answered at once" : p.job === "fast"
        ? "fast (interpolation, usually within the request)" : "slow (bridge distillation to another tokenizer: minutes)"],
      ["id", p.id],
    ];
    const dl = el("dl");
    for (const [k, v] of rows) dl.append(el("dt", { text: k }), el("dd", { text: v }));
    const kids = [dl];
    if (p.warnings && p.warnings.length) {
      kids.push(el("ul", { class: "warnings" }, ...p.warnings.map((w) => el("li", { text: w }))));
    }
    planBody.replaceChildren(...kids);
  }

  // The planned target on its chain's plot (the scale is in the svg's data-* attributes).
  function drawTarget(p) {
    for (const old of document.querySelectorAll("svg.plot .target")) old.remove();
    if (!p) return;
    const svg = document.querySelector(`svg.plot[data-chain="${CSS.escape(p.chain)}"]`);
    if (!svg) return;
    const d = svg.dataset;
    const lx = Math.log10(Math.max(1, p.non_embedding_params));
    const x = +d.left + (lx - +d.lo) / (+d.hi - +d.lo) * (+d.right - +d.left);
    const ns = "http://www.w3.org/2000/svg";
    const g = document.createElementNS(ns, "g");
    g.setAttribute("class", "target");
    const line = document.createElementNS(ns, "line");
    for (const [k, v] of [["x1", x], ["x2", x], ["y1", d.top], ["y2", d.base]]) line.setAttribute(k, v);
    const title = document.createElementNS(ns, "title");
    title.textContent = `your target: ${p.non_embedding_params.toLocaleString()} non-embedding parameters`;
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", x + 4);
    label.setAttribute("y", +d.top + 12);
    label.setAttribute("class", "lab");
    label.textContent = "target";
    line.append(title);
    g.append(line, label);
    svg.append(g);
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(checkPlan, 250);
  }
  $("#f-alpha").addEventListener("focus", () => { $("#f-alpha-mode").checked = true; schedule(); });
  form.addEventListener("input", (e) => { if (e.target !== keyInput) schedule(); });
  form.addEventListener("change", (e) => { if (e.target !== keyInput) schedule(); });

  // ------------------------------------------------------------------------------------ the job
  const jobSection = $("#job");
  const jobStatus = $("#job-status");
  const jobProgress = $("#job-progress");
  const jobError = $("#job-error");
  const jobResult = $("#job-result");

  function showProgress(j) {
    const p = j.progress || {};
    const fraction = j.status === "finished" ? 1 : typeof p.fraction === "number" ? p.fraction : 0;
    jobProgress.value = fraction;
    jobProgress.textContent = `${Math.round(fraction * 100)}%`;
    jobStatus.textContent = `${j.kind === "build_chain" ? "Chain build" : "Job"} ${j.id}: ${j.status}` +
      (p.stage ? ` (${p.stage}, ${Math.round(fraction * 100)}%)` : "") + (j.message ? `. ${j.message}` : "");
  }

  function fail(status, j) {
    jobError.replaceChildren(...errorNodes(status, j));
    jobError.hidden = false;
    submit.disabled = false;
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const body = requestBody();
    submit.disabled = true;
    jobSection.hidden = false;
    jobError.hidden = true;
    jobResult.replaceChildren();
    jobProgress.value = 0;
    jobStatus.textContent = "Submitting…";
    // A fast job may be answered within the POST: meanwhile its progress is read from /jobs/{plan id}.
    const watch = plan ? poll(plan.id) : null;
    const r = await call("POST", "/initialize", body);
    if (watch) watch.stop();
    if (r.status === 200) return done(r.json, body);
    if (r.status === 202) return follow(r.json.id, body);
    fail(r.status, r.json);
    jobStatus.textContent = `POST /initialize answered ${r.status}`;
  });

  // Progress of a job still inside its POST: read from GET /jobs (never a 404 before it is enqueued).
  function poll(id) {
    let stopped = false;
    const tick = async () => {
      if (stopped) return;
      const r = await call("GET", "/jobs?limit=20");
      if (stopped) return;
      const j = r.status === 200 ? r.json.jobs.find((x) => x.id === id) : null;
      if (j && j.status !== "finished" && j.status !== "failed") {
        showProgress({ ...j, progress: { fraction: j.fraction, stage: j.stage } });
      }
      setTimeout(tick, 500);
    };
    setTimeout(tick, 300);
    return { stop: () => { stopped = true; } };
  }

  async function follow(id, body) {
    following = id;
    for (;;) {
      const r = await call("GET", `/jobs/${encodeURIComponent(id)}`);
      if (following !== id) return;
      if (r.status !== 200) return fail(r.status, r.json);
      const j = r.json;
      showProgress(j);
      if (j.status === "failed") {
        jobStatus.textContent = `Job ${j.id} failed`;
        return fail(200, { error: j.error && j.error.type, message: j.error && j.error.message });
      }
      if (j.status === "finished") {
        if (j.kind === "build_chain") {
          jobStatus.textContent = `Chain ${j.chain || ""} is built: asking again for the init…`;
          const again = await call("POST", "/initialize", body);
          if (again.status === 200) return done(again.json, body);
          if (again.status === 202) return follow(again.json.id, body);
          return fail(again.status, again.json);
        }
        return done(j, body);
      }
      await new Promise((res) => setTimeout(res, 1000));
    }
  }

  function snippet(title, text) {
    const code = el("code", { text });
    const button = el("button", { type: "button", class: "copy", text: "Copy" });
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch (e) { // no clipboard outside secure contexts: select the text instead
        const range = document.createRange();
        range.selectNodeContents(code);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
    return el("div", { class: "snippet" }, el("h4", { text: title }), button, el("pre", {}, code));
  }

  function snippets(j, body) {
    const key = keyInput.value ? " -H \"X-API-Key: $CBD_API_KEY\"" : "";
    const json = JSON.stringify(body);
    const curl = `curl -s -X POST ${origin}/initialize -H 'content-type: application/json'${key} \\\n  -d '${json}'`;
    const a = body.architecture;
    const simple = Object.keys(body).every((k) => ["architecture", "chain", "dtype"].includes(k));
    const env = `CBD_URL=${origin}${keyInput.value ? " CBD_API_KEY=$CBD_API_KEY" : ""}`;
    let fetchCmd;
    if (simple) {
      const flags = [["--layers", a.num_hidden_layers], ["--hidden", a.hidden_size], ["--heads", a.num_attention_heads],
        ["--kv-heads", a.num_key_value_heads], ["--ffn", a.intermediate_size], ["--chain", body.chain],
        ["--dtype", body.dtype]].filter(([, v]) => v !== undefined).map(([f, v]) => `${f} ${v}`).join(" ");
      fetchCmd = `${env} cbd fetch ${flags} --out ./init`;
    } else {
      fetchCmd = `cat > init.json <<'EOF'\n${json}\nEOF\n${env} cbd fetch --spec init.json --out ./init`;
    }
    const py = "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n" +
      "model = AutoModelForCausalLM.from_pretrained(\"./init\")\ntokenizer = AutoTokenizer.from_pretrained(\"./init\")";
    const files = Object.values(j.files || {}).map((f) => `-O ${f.url}`).join(" ");
    return [snippet("curl: request it", curl), snippet("curl: download the files", `mkdir -p init && cd init && curl -fsS ${files}`),
      snippet("cbd fetch (resumable, verified, cached)", fetchCmd), snippet("transformers", py)];
  }

  // The init card (cbd.inits.calibration.init_card): step-0 losses on the chain's validation batch.
  const loss4 = (x) => (typeof x === "number" ? x.toFixed(4) : "not measured");
  const SCHEME = {
    global: "global: one alpha for every tensor",
    blocks: "blocks: an alpha per block of layers, from the global grid's best",
  };
  const BLEND = {
    fade: "fade: the bigger anchor's units that the smaller lacks, faded in by 1 − alpha",
    plain: "plain: every parameter blended, the smaller anchor grown by copies of its own units",
  };
  const REPAIR = {
    ridge: "ridge: the readers of pruned FFN neurons and query heads refit on the anchor's calibration activations",
    none: "none: plain Trans (nothing refit)",
  };

  // An alpha per tensor group ({outer, L0, L1, ...}) in words: runs of layers with the same alpha together.
  function alphaText(alpha) {
    if (typeof alpha === "number") return String(+alpha.toPrecision(6));
    if (!alpha || typeof alpha !== "object") return String(alpha);
    const parts = [];
    if (alpha.outer !== undefined) parts.push(`embeddings and head: ${alpha.outer}`);
    const layers = Object.keys(alpha).filter((k) => /^L\d+$/.test(k)).map((k) => +k.slice(1)).sort((a, b) => a - b);
    for (let i = 0; i < layers.length;) {
      let j = i;
      while (j + 1 < layers.length && layers[j + 1] === layers[j] + 1 && alpha[`L${layers[j + 1]}`] === alpha[`L${layers[i]}`]) j++;
      const range = i === j ? `layer ${layers[i]}` : `layers ${layers[i]}–${layers[j]}`;
      parts.push(`${range}: ${alpha[`L${layers[i]}`]}`);
      i = j + 1;
    }
    return parts.join("; ");
  }

  function cardNodes(card) {
    if (!card || typeof card !== "object" || typeof card.step0_loss !== "number") return [];
    const singles = Object.entries(card.single_anchors || {});
    const best = card.best_single_anchor || null;
    const role = { small: "smaller", big: "bigger" };
    const row = (cls, name, loss, note) => el("tr", { class: cls }, el("th", { scope: "row", text: name }),
      el("td", { class: "loss", text: loss4(loss) }), el("td", { class: "note", text: note || "" }));
    const vs = (loss) => (typeof loss === "number" ? `${loss - card.step0_loss >= 0 ? "+" : ""}${(loss - card.step0_loss).toFixed(4)}` : "");
    const tokens = card.validation && card.validation.tokens;
    const table = el("table", { class: "card", id: "init-card" },
      el("caption", { text: "step-0 loss (nats/token)" + (tokens ? ` on the chain's validation batch, ${tokens.toLocaleString()} tokens` : "") }),
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "start" }), el("th", { scope: "col", text: "loss" }),
        el("th", { scope: "col", text: "vs this init" }))));
    const tbody = el("tbody");
    tbody.append(row("this", "this init", card.step0_loss, "—"));
    if (best) tbody.append(row("best", `best single anchor: ${best.anchor}`, best.loss, vs(best.loss)));
    for (const [term, a] of singles) {
      tbody.append(row("single", `${a.anchor} alone (${role[term] || term} anchor, alpha ${a.alpha})`, a.loss, vs(a.loss)));
    }
    tbody.append(row("random", "random init (transformers' own, seed 0)", card.random_init_loss, vs(card.random_init_loss)));
    table.append(tbody);

    const facts = el("dl", { class: "card-facts" });
    const fact = (k, v) => facts.append(el("dt", { text: k }), el("dd", { text: v }));
    if (best && typeof card.gain_over_best_single_anchor === "number") {
      const g = card.gain_over_best_single_anchor;
      fact("gain over the best single anchor", g > 0 ? `${g.toFixed(4)} nats/token lower than ${best.anchor} alone`
        : g < 0 ? `none: ${(-g).toFixed(4)} nats/token higher than ${best.anchor} alone`
          : `none: the same loss as ${best.anchor} alone`);
    }
    if (card.alpha !== undefined) fact("alpha", alphaText(card.alpha));
    if (card.alpha_scheme) fact("alpha scheme", SCHEME[card.alpha_scheme] || card.alpha_scheme);
    if (card.repair) fact("repair", REPAIR[card.repair] || card.repair);
    if (card.blend) fact("blend", BLEND[card.blend] || card.blend);
    for (const c of Object.values(card.carry || {})) {
      fact("carry", `${c.anchor}: ${c.rotated} residual channels turned onto their principal directions, the top `
        + `${c.kept} kept (${Math.round(c.energy_kept * 100)}% of their energy)`);
    }
    const help = el("p", { class: "help", text: "Mean next-token loss before any training, on training text of every "
      + "corpus of the chain's recipe (never held out); lower is better. The single anchors are each one mapped "
      + "onto the same target shape alone." });
    return [el("section", { class: "init-card", "aria-labelledby": "init-card-h" },
      el("h4", { id: "init-card-h", text: "Init card" }), el("div", { class: "scroll" }, table), facts, help)];
  }

  function done(j, body) {
    following = null;
    submit.disabled = false;
    showProgress({ ...j, status: "finished" });
    const perBlock = j.card && j.card.alpha && typeof j.card.alpha === "object" ? "; then one per block of layers, in the init card" : "";
    jobStatus.textContent = `Job ${j.id}: finished${j.alpha !== undefined && j.alpha !== null
      ? `, alpha ${j.alpha} (${j.alpha_source}${perBlock})` : ""}`;
    const table = el("table", { class: "files" }, el("caption", { text: "Files" }),
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "file" }), el("th", { scope: "col", text: "size" }),
        el("th", { scope: "col", text: "sha256" }))));
    const tbody = el("tbody");
    for (const [name, f] of Object.entries(j.files || {})) {
      tbody.append(el("tr", {}, el("td", {}, el("a", { href: f.url, download: name, text: name })),
        el("td", { text: `${bytes(f.size)} (${f.size.toLocaleString()} B)` }), el("td", {}, el("code", { text: f.sha256 }))));
    }
    table.append(tbody);
    const kids = [el("div", { class: "scroll" }, table)];
    if (j.anchors && j.anchors.length) {
      kids.push(el("p", { text: `Anchors: ${j.anchors.map((a) => a.name || JSON.stringify(a)).join(", ")}` }));
    }
    if (j.warnings && j.warnings.length) kids.push(el("ul", { class: "warnings" }, ...j.warnings.map((w) => el("li", { text: w }))));
    if (!j.card && body && body.card === false) {
      kids.push(el("p", { id: "no-card", text: "Init card: not measured (the request said \"card\": false)." }));
    }
    kids.push(...cardNodes(j.card), ...snippets(j, body));
    jobResult.replaceChildren(...kids);
    refreshJobs();
  }

  // ------------------------------------------------------------------------------ recent jobs
  const jobsBody = $("#jobs tbody");
  async function refreshJobs() {
    const r = await call("GET", "/jobs?limit=10");
    if (r.status !== 200) {
      jobsBody.replaceChildren(el("tr", {}, el("td", { colspan: "7" }, ...errorNodes(r.status, r.json))));
      return;
    }
    if (!r.json.jobs.length) {
      jobsBody.replaceChildren(el("tr", {}, el("td", { colspan: "7", text: "No jobs yet." })));
      return;
    }
    jobsBody.replaceChildren(...r.json.jobs.map((j) => {
      const bar = el("progress", { max: "1", value: String(j.fraction || 0), "aria-label": `progress of ${j.id}` });
      return el("tr", {}, el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(j.id)}`, text: j.id.slice(0, 12) })),
        el("td", { text: j.kind }), el("td", { text: j.target || "" }), el("td", { text: j.chain || "" }),
        el("td", { text: j.status }), el("td", {}, bar),
        el("td", { text: j.enqueued_at ? new Date(j.enqueued_at).toLocaleString() : "" }));
    }));
  }
  setInterval(() => { if (!document.hidden) refreshJobs(); }, 3000);
  refreshJobs();
  checkPlan();
})();
