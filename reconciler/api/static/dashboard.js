// hypeman-ingress dashboard: fetches the status document (GET status, relative to /ui/) and renders it.
// No framework, no build step. Every value from the daemon is untrusted text (manifest names, file
// names, YAML error messages): it only ever reaches the page through textContent / attributes, never as
// markup.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let doc = null;        // the last status document
  let timer = null;
  let loading = false;

  // -- small DOM helpers -------------------------------------------------------------------------------

  // el("td", {class: "x", title: "y", data: {name: "z"}}, "text", node, ...)
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "data") for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const badge = (text, kind) => el("span", {class: "badge " + kind}, text);
  const fill = (tbody, rows) => tbody.replaceChildren(...rows);
  const str = (v) => (v === null || v === undefined ? "" : String(v));

  function ago(ts) {
    if (typeof ts !== "number") return "never";
    const secs = Math.max(0, Math.round(Date.now() / 1000 - ts));
    if (secs < 120) return secs + "s ago";
    if (secs < 7200) return Math.floor(secs / 60) + "m ago";
    if (secs < 172800) return Math.floor(secs / 3600) + "h ago";
    return Math.floor(secs / 86400) + "d ago";
  }

  function clock(ts) {
    if (typeof ts !== "number") return "-";
    const d = new Date(ts * 1000);
    return d.toLocaleString(undefined, {hour12: false});
  }

  function source(file, line) {
    return line ? str(file) + ":" + line : str(file);
  }

  // a file as "<its source's folder name>/<path inside the source>:line", the whole path as its title
  let roots = [];
  function sourceCell(file, line) {
    const full = source(file, line);
    const path = str(file);
    const root = roots.find((r) => path.startsWith(r + "/"));
    const short = root ? root.slice(root.lastIndexOf("/") + 1) + path.slice(root.length) : path;
    return el("td", {class: "src", title: full}, line ? short + ":" + line : short);
  }

  function expiry(notAfter) {
    if (!notAfter) return "";
    const when = Date.parse(String(notAfter));
    if (Number.isNaN(when)) return String(notAfter);
    const days = Math.floor(Math.abs(when - Date.now()) / 86400000);
    return when > Date.now() ? String(notAfter) + " (in " + (days ? days + "d" : "<1d") + ")"
                             : String(notAfter) + " (expired " + days + "d ago)";
  }

  const CERT_KIND = {issued: "ok", pending: "warn", failing: "bad", expired: "bad"};

  // -- the blocks ----------------------------------------------------------------------------------------

  function renderSummary(d) {
    const ingresses = d.ingresses || [];
    const ready = ingresses.filter((i) => i.ready).length;
    const loose = (d.problems || []).filter((p) => !p.ingress).length;
    const caddy = d.caddy || {};
    const rev = d.revision || {};
    $("summary").replaceChildren(
      el("span", {id: "count-ready"}, badge(ready + " ready", "ok")),
      " ",
      el("span", {id: "count-not-ready"}, badge((ingresses.length - ready) + " not ready",
                                                 ingresses.length - ready ? "bad" : "muted")),
      " ",
      el("span", {id: "count-problems"}, badge(loose + " failing file" + (loose === 1 ? "" : "s"),
                                                loose ? "bad" : "muted")),
      " ",
      badge("caddy " + (caddy.running ? "running" : str(caddy.state || "down")), caddy.running ? "ok" : "bad"),
      " ",
      el("span", {class: "muted"}, "applied ", el("code", {}, str(rev.last_applied || "-"))),
    );
  }

  function renderProblems(d) {
    // the files that failed: problems no accepted ingress owns (an ingress's own problems are in its row)
    const names = new Set((d.ingresses || []).map((i) => i.name));
    const problems = (d.problems || []).filter((p) => !p.ingress || !names.has(p.ingress));
    $("problems-section").hidden = problems.length === 0 && !d.last_error;
    $("problems-count").textContent = String(problems.length);
    const rows = problems.map((p) => el("tr", {data: {file: str(p.file)}},
      sourceCell(p.file, p.line),
      el("td", {}, badge(str(p.reason), "bad")),
      el("td", {}, str(p.ingress || "")),
      el("td", {class: "msg"}, str(p.message))));
    if (d.last_error) {
      rows.unshift(el("tr", {class: "last-error"},
        el("td", {}, "last pass"), el("td", {}, badge("error", "bad")), el("td", {}),
        el("td", {class: "msg"}, str(d.last_error))));
    }
    fill($("problems").tBodies[0], rows);
  }

  function ingressRow(i) {
    const hosts = i.hosts || [];
    const targets = i.targets || [];
    const certs = i.certificates || {};
    const tls = Object.keys(certs).length > 0;
    const health = i.health || [];
    const routes = el("ul", {class: "routes"}, hosts.map((h, n) =>
      el("li", {}, el("code", {}, str(h)), " \u2192 ", el("code", {}, str(targets[n] || "")),
         // the targets of a health-checked rule, as Caddy sees them
         health.filter((t) => t.rule === n).map((t) => el("div", {class: "target-health", data: {target: str(t.target)}},
           badge(t.healthy === true ? "healthy" : t.healthy === false ? "unhealthy" : "unknown",
                 t.healthy === true ? "ok" : t.healthy === false ? "bad" : "muted"),
           " ", el("code", {}, str(t.target)))))));
    const certList = el("ul", {class: "certs"}, Object.entries(certs).map(([host, c]) =>
      el("li", {}, badge(str(c.state || "-"), CERT_KIND[c.state] || "muted"), " ", el("code", {}, host),
         c.not_after ? el("div", {class: "muted expiry"}, expiry(c.not_after)) : null,
         c.error ? el("div", {class: "msg"}, str(c.error)) : null)));
    const problems = (i.problems || []).length
      ? el("ul", {class: "msg problems"}, i.problems.map((p) => el("li", {}, str(p)))) : null;
    const stale = typeof i.stale_since === "number"
      ? el("div", {class: "muted"}, "invalid since " + ago(i.stale_since)) : null;
    const search = [i.name, i.id, ...hosts, ...targets, source(i.file, i.line), i.reason].map(str).join(" ");
    return el("tr", {class: i.ready ? "ready" : "not-ready",
                     data: {name: str(i.name), ready: String(!!i.ready), reason: str(i.reason),
                            tls: String(tls), search: search.toLowerCase()}},
      el("td", {class: "name", title: i.id ? "id " + str(i.id) : null}, str(i.name)),
      el("td", {class: "ready-cell"}, badge(i.ready ? "ready" : "not ready", i.ready ? "ok" : "bad")),
      el("td", {}, el("div", {class: "reason"}, str(i.reason)), el("div", {class: "msg message"}, str(i.message)),
         stale, problems),
      el("td", {}, routes),
      el("td", {}, tls ? certList : el("span", {class: "muted"}, "-")),
      sourceCell(i.file, i.line));
  }

  function renderIngresses(d) {
    const ingresses = d.ingresses || [];
    fill($("ingresses").tBodies[0], ingresses.map(ingressRow));
    // the reasons seen, as filter options (keeping the choice)
    const select = $("filter-reason");
    const chosen = select.value;
    const reasons = [...new Set(ingresses.map((i) => str(i.reason)))].sort();
    if (chosen && !reasons.includes(chosen)) reasons.push(chosen);
    if (select.dataset.reasons !== reasons.join("\n")) {  // rebuilt only when they change (an open list stays)
      select.dataset.reasons = reasons.join("\n");
      select.replaceChildren(el("option", {value: ""}, "any reason"),
                             ...reasons.map((r) => el("option", {value: r}, r)));
      select.value = chosen;
    }
    applyFilters();
  }

  function applyFilters() {
    const terms = $("search").value.toLowerCase().split(/\s+/).filter(Boolean);
    const ready = $("filter-ready").value;
    const reason = $("filter-reason").value;
    const tls = $("filter-tls").value;
    let shown = 0;
    const rows = [...$("ingresses").tBodies[0].rows];
    for (const row of rows) {
      const data = row.dataset;
      const ok = terms.every((t) => data.search.includes(t))
        && (!ready || (ready === "ready") === (data.ready === "true"))
        && (!reason || data.reason === reason)
        && (!tls || (tls === "tls") === (data.tls === "true"));
      row.hidden = !ok;
      if (ok) shown += 1;
    }
    $("ingresses-count").textContent = shown === rows.length ? String(rows.length) : shown + " of " + rows.length;
    $("no-match").hidden = shown > 0 || rows.length === 0;
  }

  function processRow(name, p) {
    if (!p || !Object.keys(p).length) return null;
    const details = [];
    if (p.adopted) details.push("adopted");
    if (p.flapping) details.push("FLAPPING");
    if (name === "responder") {
      details.push(str(p.records) + (p.records === 1 ? " name" : " names") + " on " + str(p.listen));
      details.push(p.in_sync ? "in sync" : "NOT IN SYNC");
    }
    if (name === "caddy" && p.admin) details.push("admin " + p.admin);
    if (typeof p.since_seconds === "number") details.push("for " + Math.round(p.since_seconds) + "s");
    return el("tr", {data: {process: name}},
      el("td", {}, name),
      el("td", {}, badge(p.running ? "running" : "not running (" + str(p.state || "down") + ")",
                         p.running ? (p.flapping ? "warn" : "ok") : "bad")),
      el("td", {}, str(p.pid)),
      el("td", {}, str(p.restarts || 0)),
      el("td", {}, details.join(", "), p.last_error ? el("div", {class: "msg"}, str(p.last_error)) : null));
  }

  function renderProcesses(d) {
    const rows = [processRow("caddy", d.caddy), processRow("responder", d.responder)];
    const failing = (d.storage && d.storage.failing) || [];
    if (d.storage) {
      rows.push(el("tr", {data: {process: "storage"}},
        el("td", {}, "storage"),
        el("td", {}, badge(failing.length ? "cannot write" : "ok", failing.length ? "bad" : "ok")),
        el("td", {}), el("td", {}),
        el("td", {}, failing.map((f) => el("div", {class: "msg"},
          str(f.file) + ": " + str(f.error) + " (since " + ago(f.since) + ", " + str(f.attempts) + " attempts)")))));
    }
    fill($("processes").tBodies[0], rows.filter(Boolean));
  }

  function renderSources(d) {
    fill($("sources").tBodies[0], (d.sources || []).map((s) => el("tr", {data: {ok: String(!!s.ok)}},
      el("td", {class: "src"}, str(s.path)),
      el("td", {}, badge(s.ok ? "ok" : "unavailable", s.ok ? "ok" : "bad")),
      el("td", {}, str(s.files === undefined ? "" : s.files)),
      el("td", {}, s.commit ? el("code", {}, str(s.commit)) : null,
         s.error ? el("div", {class: "msg"}, str(s.error)) : null))));
  }

  function renderCertificates(d) {
    const certs = Object.entries(d.certificates || {}).sort(([a], [b]) => (a < b ? -1 : 1));
    $("no-certificates").hidden = certs.length > 0;
    $("certificates").hidden = certs.length === 0;
    fill($("certificates").tBodies[0], certs.map(([host, c]) => el("tr", {data: {host: host}},
      el("td", {}, el("code", {}, host)),
      el("td", {}, badge(str(c.state || "-"), CERT_KIND[c.state] || "muted")),
      el("td", {}, expiry(c.not_after)),
      el("td", {}, str(c.issuer || "")),
      el("td", {class: "msg"}, c.error ? (c.state === "issued" ? "renewal failing: " : "") + str(c.error) : ""))));
  }

  function renderHistory(d) {
    const rev = d.revision || {};
    const attempted = d.last_attempted || {};
    const applied = d.last_applied || {};
    const items = [
      ["last applied", str(rev.last_applied || "-"), ago(applied.at)],
      ["last attempted", str(rev.last_attempted || "-"),
       ago(attempted.at) + ", " + str(attempted.outcome || "-") + ", trigger " + str(attempted.trigger || "-")],
      ...Object.entries(rev.commits || {}).sort().map(([src, commit]) => ["git commit", str(commit), src]),
    ];
    const node = d.node;
    if (node) {  // who this node is; the config hash is equal on every node of a converged fleet
      items.push(["node", str(node.name || "-"), node.fleet ? "fleet node" : "single node"]);
      items.push(["config hash", str(node.config_hash || "-"),
                  "certificates in " + str(node.tls_storage || "-") + (node.shared_storage ? " (shared)" : "")]);
    }
    $("revisions").replaceChildren(...items.flatMap(([k, v, note]) =>
      [el("dt", {}, k), el("dd", {}, el("code", {}, v), " ", el("span", {class: "muted"}, note))]));
    const passes = [...(d.history || [])].reverse();
    fill($("history").tBodies[0], passes.map((p) => el("tr", {class: "outcome-" + str(p.outcome)},
      el("td", {title: clock(p.at)}, clock(p.at), el("div", {class: "muted"},
         ago(p.at) + (p.repeats > 1 ? " \u00d7" + p.repeats + " since " + ago(p.first_at) : ""))),
      el("td", {}, str(p.trigger)),
      el("td", {}, el("code", {}, str(p.revision))),
      el("td", {}, badge(str(p.outcome), p.error ? "bad" : p.outcome === "applied" ? "ok" : "muted")),
      el("td", {}, str(p.changes)),
      el("td", {}, typeof p.duration_ms === "number" ? p.duration_ms.toFixed(1) + " ms" : ""),
      el("td", {class: "msg"}, str(p.error || "")))));
  }

  function render(d) {
    roots = (d.sources || []).map((s) => str(s.root || s.path).replace(/\/+$/, "")).filter(Boolean)
      .sort((a, b) => b.length - a.length);  // the deepest first
    renderSummary(d);
    renderProblems(d);
    renderIngresses(d);
    renderProcesses(d);
    renderSources(d);
    renderCertificates(d);
    renderHistory(d);
  }

  // -- fetching ------------------------------------------------------------------------------------------

  function showError(text) {
    const banner = $("error");
    banner.textContent = text;
    banner.hidden = !text;
  }

  async function refresh() {
    if (loading) return;
    loading = true;
    clearTimeout(timer);
    try {
      const response = await fetch("status", {cache: "no-store", credentials: "same-origin",
                                              headers: {Accept: "application/json"}});
      if (!response.ok) {
        let why = "";
        try { why = (await response.json()).message || ""; } catch (e) { why = ""; }
        throw new Error("HTTP " + response.status + (why ? ": " + why : ""));
      }
      doc = await response.json();
      render(doc);
      showError("");
      const now = new Date();
      $("updated").textContent = "updated " + now.toLocaleTimeString(undefined, {hour12: false});
      document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
    } catch (err) {
      showError("cannot load the status from the daemon: " + (err && err.message ? err.message : String(err))
                + (doc ? " (showing the last one)" : ""));
      document.body.dataset.failed = String(Number(document.body.dataset.failed || 0) + 1);
    } finally {
      loading = false;
      schedule();
    }
  }

  function schedule() {
    clearTimeout(timer);
    const seconds = Number($("interval").value);
    if (seconds > 0) timer = setTimeout(refresh, seconds * 1000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const id of ["search", "filter-ready", "filter-reason", "filter-tls"]) {
      $(id).addEventListener("input", applyFilters);
      $(id).addEventListener("change", applyFilters);
    }
    $("interval").addEventListener("change", schedule);
    $("reload").addEventListener("click", refresh);
    // the filters survive a reload of the page through the URL's fragment
    const saved = new URLSearchParams(location.hash.slice(1));
    if (saved.has("q")) $("search").value = saved.get("q");
    $("search").addEventListener("input", () => {
      const q = $("search").value;
      history.replaceState(null, "", q ? "#q=" + encodeURIComponent(q) : location.pathname);
    });
    refresh();
  });
})();
