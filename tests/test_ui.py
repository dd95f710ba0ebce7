"""The dashboard at ``/ui/``: its files and headers, its auth, and the page itself in a real headless Chromium.

The browser test runs ``hypeman-ingress run`` (real Caddy, a real loopback backend) with a token, one good
ingress, one with TLS (Caddy's internal CA), one whose instance is stopped and one broken manifest file,
opens the page in Debian's ``chromium`` driven over the DevTools protocol (:mod:`tests.cdp`), answers the
browser's Basic prompt once as a user would, and reads what the page shows. It is skipped when Chromium is
missing unless ``HYPEMAN_REQUIRE_CHROMIUM=1`` (``make test`` sets it and installs the package). The
screenshot is kept in ``$HYPEMAN_ARTIFACTS`` (default ``test-artifacts/``) as ``dashboard.png``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from reconciler.api.app import create_app
from reconciler.api.auth import authorized, basic_password
from reconciler.api.ui import ASSETS, CSP
from reconciler.api.writer import ManifestWriter
from reconciler.settings import Settings
from tests.cdp import Browser, Page, find_chromium
from tests.helpers import ROOT, Backend, Daemon, free_port, ingress_yaml, instance_yaml, wait_for, write

with warnings.catch_warnings():  # starlette >= 1.x nags about httpx vs httpx2 in its test client
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

UI_DIR = ROOT / "reconciler" / "api" / "static"
TOKEN = "tok-" + secrets.token_urlsafe(24)


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- the files ---------------------------------------------------------------------------------------------

def test_the_ui_files_reference_only_local_assets() -> None:
    """No CDN, no remote font, no absolute URL anywhere: the page works on a host with no way out."""
    files = sorted(UI_DIR.iterdir())
    assert {f.name for f in files} == set(ASSETS)
    for f in files:
        text = f.read_text()
        assert not re.search(r"https?:|wss?:|ftp:", text, re.I), f.name
        assert not re.search(r"""(?:src|href|url)\s*[=(]\s*["']?//""", text, re.I), f.name  # protocol-relative
        assert "@import" not in text, f.name
    html = (UI_DIR / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*"([^"]*)\"""", html)
    assert refs and set(refs) <= {*ASSETS, "data:,"}, refs
    assert set(ASSETS) - {"index.html"} <= set(refs)


def test_the_ui_has_no_inline_code_and_never_writes_markup() -> None:
    """Nothing inline for the CSP to refuse, and no way for a daemon value to become markup: the script
    builds nodes and sets ``textContent`` only."""
    html = (UI_DIR / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="dashboard.js" defer>']
    assert not re.search(r"<script\b[^>]*>\s*[^<\s]", html)  # no inline script body
    assert not re.search(r"<style\b|\sstyle\s*=|\son[a-z]+\s*=", html, re.I)
    js = (UI_DIR / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setTimeout(\"", "setTimeout('", "srcdoc"):
        assert sink not in js, sink


# -- in process: routes, headers, auth ------------------------------------------------------------------

class _StatusOnly:
    """A backend that knows only a fixed status document."""

    DOC: ClassVar[dict[str, Any]] = {"revision": {"last_attempted": "abc", "last_applied": "abc", "commits": {}},
                           "ingresses": [], "problems": [], "history": [], "sources": []}

    def status(self) -> dict[str, Any]:
        return dict(self.DOC)

    def ready(self) -> tuple[bool, str]:
        return True, "ok"


@pytest.fixture
def client_for(tmp_path: Path) -> Iterator[Callable[[str | None], TestClient]]:
    clients: list[TestClient] = []

    def make(token: str | None) -> TestClient:
        settings = Settings(data_dir=str(tmp_path / "data"), instances_dir=str(tmp_path / "instances"))
        os.makedirs(settings.api_dir, mode=0o700, exist_ok=True)
        writer = ManifestWriter(settings, validate_config=lambda config: None)
        app = create_app(writer=writer, backend=_StatusOnly(), token=token)  # type: ignore[arg-type]
        client = TestClient(app, raise_server_exceptions=False, follow_redirects=False)
        clients.append(client.__enter__())
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_the_ui_is_served_with_a_strict_policy(client_for: Callable[[str | None], TestClient]) -> None:
    client = client_for(None)
    r = client.get("/ui")
    assert r.status_code == 308 and r.headers["location"] == "ui/"  # relative: works under a path prefix
    for path, media in [("/ui/", "text/html"), ("/ui/dashboard.js", "text/javascript"),
                        ("/ui/dashboard.css", "text/css")]:
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(media), path
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-cache"
    assert r.content == (UI_DIR / "dashboard.css").read_bytes()
    assert "default-src 'self'" in CSP and "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP
    r = client.get("/ui/status")
    assert r.status_code == 200 and r.json() == client.get("/status").json() == _StatusOnly.DOC
    assert r.headers["cache-control"] == "no-store" and r.headers["content-security-policy"] == CSP
    assert client.get("/ui/index.html").status_code == 404
    assert client.get("/ui/dashboard.py").status_code == 404
    assert client.post("/ui/status").status_code == 405


def test_basic_auth_with_the_token_as_password(client_for: Callable[[str | None], TestClient]) -> None:
    client = client_for(TOKEN)
    good = [basic("admin", TOKEN), basic("", TOKEN), basic("anyone at all", TOKEN),
            {"Authorization": f"Bearer {TOKEN}"}]
    bad: list[dict[str, str]] = [
        {}, basic("admin", TOKEN + "x"), basic("admin", TOKEN[:-1]), basic(TOKEN, ""), basic("admin", ""),
        {"Authorization": "Basic " + base64.b64encode(TOKEN.encode()).decode()},  # no colon: no password
        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Basic"}, {"Authorization": "Basic !!!="},
        {"Authorization": "Basic " + "A" * 5}, {"Authorization": "Basic w6k="},  # not base64 / not "user:pw"
        {"Authorization": "Digest " + base64.b64encode(f"a:{TOKEN}".encode()).decode()},
        {"Authorization": f"Bearer {base64.b64encode(f'a:{TOKEN}'.encode()).decode()}"},
    ]
    for path in ("/ui", "/ui/", "/ui/dashboard.js", "/ui/status", "/status", "/ingresses", "/readyz"):
        for headers in bad:
            r = client.get(path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["code"] == "unauthorized"
            assert TOKEN not in r.text
            # the dashboard asks for Basic (a browser prompts); the API still names Bearer
            expected = 'Basic realm="hypeman-ingress", charset="UTF-8"' if path.startswith("/ui") else "Bearer"
            assert r.headers["www-authenticate"] == expected, path
            assert ("API token as the password" in r.json()["message"]) == path.startswith("/ui"), path
        for headers in good:
            assert client.get(path, headers=headers).status_code in (200, 308), (path, headers)
    assert client.get("/healthz").status_code == 200  # the liveness probe stays open
    assert client.get("/uix", headers={}).headers["www-authenticate"] == "Bearer"  # only /ui and below


def test_basic_password_parsing() -> None:
    token = TOKEN.encode()
    assert basic_password(base64.b64encode(b"user:pa:ss").decode()) == b"pa:ss"  # the password may hold ':'
    assert basic_password(base64.b64encode("\u00e9:x".encode()).decode()) == b"x"
    for junk in ("", "====", "\u00e9\u00e9", "a b", base64.b64encode(b"nocolon").decode()):
        assert basic_password(junk) == b""
    assert authorized("basic " + base64.b64encode(b"u:" + token).decode(), token)
    assert authorized("BEARER " + TOKEN, token)
    assert not authorized("Basic " + base64.b64encode(b"u:" + token + b"\n").decode(), token)
    assert not authorized("", token) and not authorized(TOKEN, token)


# -- in a real browser -------------------------------------------------------------------------------------

REQUIRE_ENV = "HYPEMAN_REQUIRE_CHROMIUM"


def chromium_or_skip() -> str:
    """Chromium's path; without one the test is skipped, or fails under ``make test`` (:data:`REQUIRE_ENV`)."""
    binary = find_chromium()
    if binary is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"chromium is required ({REQUIRE_ENV}=1): apt-get install chromium")
        pytest.skip("chromium is not installed (Debian package chromium)")
    return binary


def test_without_chromium_the_browser_test_skips_or_fails_under_make_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.test_ui.find_chromium", lambda: None)
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        chromium_or_skip()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        chromium_or_skip()
    # make test installs chromium with the other Debian test deps and requires it (read, not run: make
    # would reinstall the venv)
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and all(f"{REQUIRE_ENV}=1" in line for line in recipe.group(1).splitlines() if "pytest" in line)
    deps = re.search(r"^system-deps:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert deps and 'missing="$$missing chromium"' in deps.group(1)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(chromium_or_skip(), log_path=tmp_path / "chromium.log")
    try:
        yield b
    finally:
        b.close()


def artifacts_dir() -> Path:
    return Path(os.environ.get("HYPEMAN_ARTIFACTS") or ROOT / "test-artifacts")


def js(expression: str, *args: Any) -> str:
    """``expression`` with ``$1``, ``$2``... replaced by JSON literals of ``args`` (no quoting by hand)."""
    for n, arg in enumerate(args, 1):
        expression = expression.replace(f"${n}", json.dumps(arg))
    return expression


#: what the page shows, as plain data read from the DOM
READ_PAGE = """(() => {
  if (!document.getElementById('ingresses')) return null;  // not the dashboard (yet): an error page, say
  const rows = [...document.querySelectorAll('#ingresses tbody tr')];
  const text = (root, sel) => { const n = root.querySelector(sel); return n ? n.textContent : null; };
  return {
    loaded: Number(document.body.dataset.loaded || 0),
    failed: Number(document.body.dataset.failed || 0),
    error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
    ingresses: Object.fromEntries(rows.map(r => [r.dataset.name, {
      ready: r.dataset.ready === 'true', reason: r.dataset.reason, hidden: r.hidden,
      badge: text(r, '.ready-cell'), message: text(r, '.message'), source: text(r, '.src'),
      path: r.querySelector('.src').title,
      routes: [...r.querySelectorAll('ul.routes li')].map(li => li.textContent),
      certificates: [...r.querySelectorAll('ul.certs li')].map(
        li => [...li.children].map(c => c.textContent).join(' '))}])),
    certificates: [...document.querySelectorAll('#certificates tbody tr')].map(
      r => [r.dataset.host, [...r.cells].map(c => c.textContent).join(' ')]),
    problems: [...document.querySelectorAll('#problems tbody tr')].map(r => r.textContent),
    problemPaths: [...document.querySelectorAll('#problems tbody .src')].map(c => c.title),
    problemsShown: !document.getElementById('problems-section').hidden,
    processes: Object.fromEntries([...document.querySelectorAll('#processes tbody tr')].map(
      r => [r.dataset.process, r.textContent])),
    sources: [...document.querySelectorAll('#sources tbody tr')].map(r => [r.dataset.ok, r.textContent]),
    history: [...document.querySelectorAll('#history tbody tr')].map(r => r.textContent),
    revisions: document.getElementById('revisions').textContent,
    count: document.getElementById('ingresses-count').textContent,
    summary: document.getElementById('summary').textContent,
  };
})()"""


def page_state(page: Page) -> dict[str, Any]:
    state: dict[str, Any] | None = page.evaluate(READ_PAGE)
    if state is None:
        raise AssertionError(f"not the dashboard: {page.evaluate('document.body.innerText')[:300]!r}")
    return state


def wait_page(page: Page, check: Callable[[], dict[str, Any] | None], message: str) -> dict[str, Any]:
    """:func:`wait_for` ``check``; on timeout, what the page shows and logged goes with the failure."""
    try:
        found: dict[str, Any] = wait_for(check, timeout=30, message=message)  # type: ignore[arg-type]
        return found
    except AssertionError as exc:
        shown = page.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
        raise AssertionError(f"{exc}\npage text: {shown!r}\nbrowser log: {page.console}") from None


def status_now(daemon: Daemon) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{daemon.api_url}/status", headers={"Authorization": f"Bearer {TOKEN}"},
                                    timeout=10).json()
    return doc


def set_value(page: Page, element_id: str, value: str) -> None:
    """Type into an input / pick in a select, as a user would: the value, then its input event."""
    page.evaluate(js("(() => { const e = document.getElementById($1); e.value = $2;"
                     " e.dispatchEvent(new Event('input', {bubbles: true}));"
                     " e.dispatchEvent(new Event('change', {bubbles: true})); })()", element_id, value))


@pytest.mark.caddy
def test_dashboard_in_headless_chromium(tmp_path: Path, browser: Browser) -> None:
    started = time.monotonic()
    backend = Backend("web")
    # Caddy's internal CA: a TLS ingress gets a real certificate at once, with no ACME server
    daemon = Daemon(tmp_path, env={"INGRESS_API_TOKEN": TOKEN, "TLS_ISSUER": "internal"})
    try:
        _run_dashboard_scenario(tmp_path, browser, daemon, backend)
    finally:
        daemon.cleanup()
        backend.close()
    print(f"dashboard browser test: {time.monotonic() - started:.1f}s with {browser.version}")


def _run_dashboard_scenario(tmp_path: Path, browser: Browser, daemon: Daemon, backend: Backend) -> None:
    port = free_port()
    manifests = daemon.manifests[0]
    write(daemon.instances / "vms.yaml",
          instance_yaml("web") + "---\n" + instance_yaml("db", state="Stopped"))
    good = write(manifests / "shop.yaml", ingress_yaml("shop", "shop.example.test", port, "web", backend.port))
    stopped = write(manifests / "team" / "reports.yaml",
                    "# reports, served by the db VM\n"
                    + ingress_yaml("reports", "reports.example.test", port, "db", backend.port))
    https = int(daemon.env["CADDY_HTTPS_PORT"])
    secure = write(manifests / "secure.yaml",
                   ingress_yaml("secure", "secure.example.test", https, "web", backend.port) + "    tls: true\n")
    broken = write(manifests / "broken.yaml", "name: broken\nrules:\n  - match: {hostname: [oops\n")
    daemon.start()

    page = browser.page()
    page.answer_auth("admin", TOKEN)  # what a user types into the browser's prompt: any name, the token
    page.navigate(f"{daemon.api_url}/ui")  # the redirect to /ui/ too

    def shown() -> dict[str, Any] | None:
        state = page_state(page)
        return state if (state["loaded"] and len(state["ingresses"]) == 3 and state["problems"]
                         and state["ingresses"]["secure"]["ready"]) else None  # its certificate issued

    state = wait_page(page, shown, "the dashboard showing the ingresses and the broken file")
    assert page.auth_challenges and page.auth_challenges[0].lower() == "basic hypeman-ingress"
    # from now on the browser is on its own: the page's refreshes must go with the credentials it keeps
    page.stop_answering_auth()
    assert page.evaluate("location.pathname") == "/ui/"
    assert state["error"] is None and state["failed"] == 0

    shop, reports = state["ingresses"]["shop"], state["ingresses"]["reports"]
    assert shop["ready"] and shop["reason"] == "Applied" and shop["badge"] == "ready"
    assert shop["source"] == "manifests/shop.yaml:1" and shop["path"] == f"{good}:1"  # the whole path on hover
    assert shop["routes"] == [f"shop.example.test:{port} \u2192 web:{backend.port}"]
    secure_row = state["ingresses"]["secure"]
    assert secure_row["reason"] == "Applied" and secure_row["path"] == f"{secure}:1"
    not_after = status_now(daemon)["certificates"]["secure.example.test"]["not_after"]
    (cert,) = secure_row["certificates"]  # its state and expiry
    assert cert.startswith(f"issued secure.example.test {not_after} (in "), cert
    assert not reports["ready"] and reports["reason"] == "InstanceNotRunning" and reports["badge"] == "not ready"
    assert "instance 'db' is not running" in reports["message"]
    assert reports["source"] == "manifests/team/reports.yaml:2" and reports["path"] == f"{stopped}:2"
    (problem,) = state["problems"]
    assert "manifests/broken.yaml:4" in problem and "InvalidManifest" in problem and "YAML syntax error" in problem
    assert state["problemPaths"] == [f"{broken}:4"]
    assert state["problemsShown"]
    assert "running" in state["processes"]["caddy"] and "not running" not in state["processes"]["caddy"]
    assert "running" in state["processes"]["responder"] and "in sync" in state["processes"]["responder"]
    assert state["sources"] and all(ok == "true" for ok, _ in state["sources"])
    assert any(str(manifests) in text for _, text in state["sources"])
    status = status_now(daemon)
    assert status["revision"]["last_applied"] in state["revisions"]
    assert status["node"]["name"] in state["revisions"] and "config hash" in state["revisions"]
    assert state["history"] and status["history"][-1]["revision"] in state["history"][0]
    certificates = dict(state["certificates"])
    assert certificates["secure.example.test"].startswith(f"secure.example.test issued {not_after} (in ")
    assert certificates["secure.example.test"].rstrip().endswith(" local")  # the issuer
    assert "2 ready" in state["summary"] and "1 not ready" in state["summary"] and "1 failing file" in state["summary"]

    shot = page.screenshot(artifacts_dir() / "dashboard.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    # the search box and the filters hide and show rows (and say how many match)
    def visible() -> set[str]:
        return {n for n, i in page_state(page)["ingresses"].items() if not i["hidden"]}

    set_value(page, "search", "REPORTS.example")  # a host, any case
    assert visible() == {"reports"}
    assert page_state(page)["count"] == "1 of 3"
    set_value(page, "search", "web")  # an instance
    assert visible() == {"shop", "secure"}
    set_value(page, "search", "team/")  # a file
    assert visible() == {"reports"}
    set_value(page, "search", "nothing-like-this")
    assert visible() == set() and page.evaluate("!document.getElementById('no-match').hidden")
    set_value(page, "search", "")
    assert visible() == {"shop", "reports", "secure"}
    set_value(page, "filter-ready", "not-ready")
    assert visible() == {"reports"}
    set_value(page, "filter-ready", "ready")
    assert visible() == {"shop", "secure"}
    set_value(page, "filter-ready", "")
    set_value(page, "filter-reason", "InstanceNotRunning")
    assert visible() == {"reports"}
    set_value(page, "filter-reason", "")
    set_value(page, "filter-tls", "tls")
    assert visible() == {"secure"}
    set_value(page, "filter-tls", "plain")
    assert visible() == {"shop", "reports"}
    set_value(page, "filter-tls", "")
    assert visible() == {"shop", "reports", "secure"}

    # it refreshes itself (with the browser's kept credentials): the instance starts, a hostile file name
    # appears -- as text, never as markup
    set_value(page, "interval", "2")
    loaded = page_state(page)["loaded"]
    write(daemon.instances / "vms.yaml", instance_yaml("web") + "---\n" + instance_yaml("db"))
    hostile = write(manifests / "<img src=x onerror=window.pwned=1>.yaml", "name: [\n")
    # and shop gets a health check: its target shows Caddy's verdict (Caddy reports it within 10 s)
    write(good, ingress_yaml("shop", "shop.example.test", port, "web", backend.port)
          + "    health_check: {active: {path: /healthz, interval: 500ms}}\n")

    def refreshed() -> dict[str, Any] | None:
        state = page_state(page)
        return state if (state["ingresses"]["reports"]["ready"] and len(state["problems"]) == 2
                         and state["loaded"] > loaded
                         and "healthy web:" in "".join(state["ingresses"]["shop"]["routes"])) else None

    state = wait_page(page, refreshed, "the page refreshing to the started instance, the new file, shop's health")
    assert state["ingresses"]["shop"]["routes"] == [
        f"shop.example.test:{port} \u2192 web:{backend.port}healthy web:{backend.port}"]
    assert any(f"manifests/{hostile.name}" in p for p in state["problems"])
    assert f"{hostile}:2" in state["problemPaths"]
    assert page.evaluate("document.querySelectorAll('body img').length") == 0
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert state["error"] is None and state["failed"] == 0
    assert all(c.lower() == "basic hypeman-ingress" for c in page.auth_challenges), page.auth_challenges
    assert not [line for line in page.console if "exception" in line or "Content Security Policy" in line], \
        page.console
    assert TOKEN not in daemon.log_path.read_text(errors="replace")

    # the daemon goes away: the page says so and keeps showing the last status
    daemon.stop()
    def banner() -> dict[str, Any] | None:
        state = page_state(page)
        return state if state["error"] else None

    state = wait_page(page, banner, "the page's error banner")
    assert "cannot load the status" in state["error"] and "showing the last one" in state["error"]
    assert set(state["ingresses"]) == {"shop", "reports", "secure"}


VALID = ('{"name": "evil", "rules": [{"match": {"hostname": "evil.example.com"}, '
         '"target": {"instance": "vm", "port": 80}}]}')


@pytest.mark.parametrize("token", [TOKEN, None], ids=["token", "no-token"])
def test_a_web_page_cannot_write_through_the_browser(token: str | None, tmp_path: Path,
                                                     client_for: Callable[[str | None], TestClient]) -> None:
    """Cross-site request forgery: a page the operator visits makes the browser POST (a form's text/plain
    body is valid JSON) or DELETE, with the Basic login it keeps for the dashboard. Refused: Basic is for
    reads only, and a browser's Origin / Sec-Fetch-Site of another site is refused whatever the login."""
    client = client_for(token)
    creds = basic("admin", TOKEN) if token else {}
    api_dir = tmp_path / "data" / "ingresses"
    forged = [{"Origin": "http://evil.example", "Content-Type": "text/plain"},
              {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
              {"Origin": "http://testserver.evil.example"}]
    for headers in forged:
        for method, path, body in (("POST", "/ingresses", VALID), ("DELETE", "/ingresses/web", None)):
            r = client.request(method, path, content=body, headers={**creds, **headers})
            assert r.status_code == 403 and r.json()["code"] == "cross_origin", (method, headers, r.text)
            assert "another" in r.json()["message"]
    assert not list(api_dir.iterdir())  # nothing written
    if token:  # Basic credentials never write, even from no page at all
        r = client.post("/ingresses", content=VALID, headers=creds)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        assert client.get("/ingresses", headers=creds).status_code == 200  # they read
        creds = {"Authorization": f"Bearer {token}"}
    # API clients (no Origin, or this API's own, or a same-origin page) get through to the writer: a body
    # that breaks the schema is its 400, not a refusal at the door
    for headers in ({}, {"Origin": "http://testserver"}, {"Sec-Fetch-Site": "same-origin"},
                    {"Sec-Fetch-Site": "none"}):
        r = client.post("/ingresses", content='{"name": "x"}', headers={**creds, **headers})
        assert r.status_code == 400 and r.json()["code"] == "bad_request", (headers, r.text)
    assert not list(api_dir.iterdir())
