"""Error pages (issue 16, part 3b): the operator's pages (``HYPEMAN_ERROR_PAGES_DIR``: ``404``, ``502``,
``503``, ``504`` as ``.html`` and ``.txt``) and an ingress's own (``error_pages``), served by Caddy's
error routes for their cause, naming the host or instance (``{host}``, ``{instance}``: HTML-escaped in
HTML), HTML to clients that accept it and text otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from reconciler.errors import ConfigError
from reconciler.settings import Settings
from reconciler.sources.pages import with_error_pages
from tests.helpers import ROOT, Daemon, Service, free_port, instance_yaml, validate_cli, wait_for, write


def test_page_files_are_checked(tmp_path: Path) -> None:
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "503.html").write_text("<h1>down</h1>")
    (pages / "404.txt").write_text("nothing here for {host}\n")
    (pages / "README").write_text("ignored")
    loaded = with_error_pages(Settings(error_pages_dir=str(pages)))
    assert loaded.error_pages == ((404, None, "nothing here for {host}\n"), (503, "<h1>down</h1>", None))
    (pages / "502.html").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"502\.html: not UTF-8 text"):
        with_error_pages(Settings(error_pages_dir=str(pages)))
    (pages / "502.html").write_text("a\x01b")
    with pytest.raises(ConfigError, match=r"502\.html: holds control characters"):
        with_error_pages(Settings(error_pages_dir=str(pages)))
    with pytest.raises(ConfigError, match="no such directory"):
        with_error_pages(Settings(error_pages_dir=str(tmp_path / "missing")))


def test_a_bad_page_dir_stops_the_cli_with_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "reconciler.cli", "render", "--data-dir", str(tmp_path / "d")],
                       cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "HYPEMAN_ERROR_PAGES_DIR": str(tmp_path / "missing")})
    assert r.returncode == 2 and "HYPEMAN_ERROR_PAGES_DIR" in r.stderr and "no such directory" in r.stderr


def test_error_pages_against_caddy(tmp_path: Path, daemon_factory: Callable[..., Daemon],
                                   services: Callable[[str], Service]) -> None:
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "404.html").write_text("<!doctype html><h1>No site at {host}</h1>\n")
    (pages / "404.txt").write_text("no site at {host} -- try another\n")
    (pages / "503.html").write_text("<!doctype html><h1>{instance} is resting {{env \"HOME\"}} {env.HOME}</h1>\n")
    slow = services("slow")
    port = free_port()
    d = daemon_factory(env={"HYPEMAN_ERROR_PAGES_DIR": str(pages)})
    write(d.instances / "vms.yaml", instance_yaml("slow") + "---\n" + instance_yaml("a<b>", state="Stopped"))
    write(d.manifests[0] / "plain.yaml", f"name: plain\nrules:\n  - match: {{hostname: plain.test, port: {port}}}\n"
                                         f"    target: {{instance: 'a<b>', port: 1}}\n")
    write(d.manifests[0] / "own.yaml", f"""name: own
rules:
  - match: {{hostname: own.test, port: {port}}}
    target: {{instance: 'a<b>', port: 1}}
  - match: {{hostname: slow.test, port: {port}}}
    target: {{instance: slow, port: {slow.port}}}
    limits: {{response_header_timeout: 300ms}}
error_pages:
  "503": {{text: "own page: {{instance}} on {{host}} is off\\n"}}
  "504": {{html: "<p>{{instance}} was too slow for {{host}}</p>", text: "too slow\\n"}}
""")
    d.start()
    url = f"http://127.0.0.1:{port}"
    html, text = {"Accept": "text/html"}, {"Accept": "*/*"}

    def get(host: str, headers: dict[str, str], path: str = "/") -> httpx.Response:
        return httpx.get(url + path, headers={"Host": host, **headers}, timeout=10)

    wait_for(lambda: get("plain.test", text).status_code == 503, timeout=15, message="served")
    # the operator's 404, both kinds, naming the host (escaped in HTML)
    r = get("nowhere.test", html)
    assert r.status_code == 404 and r.text == "<!doctype html><h1>No site at nowhere.test</h1>\n"
    assert r.headers["Content-Type"].startswith("text/html")
    assert get("nowhere.test", text).text == "no site at nowhere.test -- try another\n"
    # the operator's 503 in HTML: the instance name escaped, the page's braces and template-like text literal
    r = get("plain.test", html)
    assert r.status_code == 503
    assert r.text == '<!doctype html><h1>a&lt;b&gt; is resting {{env "HOME"}} {env.HOME}</h1>\n', r.text
    # no text page from the operator for 503: the built-in text
    assert get("plain.test", text).text == '503 Service Unavailable: instance "a<b>" is not running or not known\n'
    # the ingress's own 503 text wins on its hosts; its HTML is the operator's
    assert get("own.test", text).text == "own page: a<b> on own.test is off\n"
    assert get("own.test", html).text.startswith("<!doctype html><h1>a&lt;b&gt; is resting")
    # its own 504
    r = get("slow.test", html, "/slow?s=2")
    assert r.status_code == 504 and r.text == "<p>slow was too slow for slow.test</p>"
    assert get("slow.test", text, "/slow?s=2").text == "too slow\n"


def test_the_readme_example_is_valid() -> None:
    from reconciler.render import Renderer
    from tests.test_tls import desired_of

    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml", readme.index("### Error pages")) + len("```yaml")
    desired = desired_of([readme[start:readme.index("```", start)]], Settings())
    assert not desired.problems, desired.problems
    assert [s for s, _, _ in desired.ingresses[0].ingress.error_pages] == [503, 504]
    errors = Renderer(Settings())(desired)["apps"]["http"]["servers"]["ingress-80"]["errors"]["routes"]
    assert any("'{http.vars.ingress}': ['shop']" in str(r) for r in errors)


def test_a_502_page_for_a_target_that_answers_garbage(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen(16)
    stop = threading.Event()

    def garbage() -> None:  # accepts, reads the request, answers something that is not HTTP
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(b"this is not HTTP\r\n\r\n")

    worker = threading.Thread(target=garbage, daemon=True)
    worker.start()
    try:
        pages = tmp_path / "pages"
        pages.mkdir()
        (pages / "502.html").write_text("<p>{instance} answered nonsense to {host}</p>")
        port = free_port()
        d = daemon_factory(env={"HYPEMAN_ERROR_PAGES_DIR": str(pages)})
        write(d.instances / "vms.yaml", instance_yaml("junk"))
        write(d.manifests[0] / "junk.yaml", f"name: junk\nrules:\n  - match: {{hostname: junk.test, port: {port}}}\n"
                                            f"    target: {{instance: junk, port: {listener.getsockname()[1]}}}\n")
        d.start()
        url = f"http://127.0.0.1:{port}/"
        wait_for(lambda: httpx.get(url, headers={"Host": "junk.test"}, timeout=5).status_code == 502, timeout=15,
                 message="502")
        r = httpx.get(url, headers={"Host": "junk.test", "Accept": "text/html"}, timeout=5)
        assert r.status_code == 502 and r.text == "<p>junk answered nonsense to junk.test</p>"
        plain = httpx.get(url, headers={"Host": "junk.test"}, timeout=5)
        assert plain.text == '502 Bad Gateway: instance "junk"\n'
    finally:
        stop.set()
        worker.join(timeout=5)
        listener.close()


def test_control_characters_in_a_manifest_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "m" / "a.yaml", 'name: a\nrules:\n  - match: {hostname: a.test}\n'
                                            '    target: {instance: vm, port: 1}\n'
                                            'error_pages:\n  "503": {html: "\\x01env \\"HOME\\"\\x02"}\n')
    rc, out = validate_cli(path)
    assert rc == 1 and "error_pages.503.html: control characters are not allowed" in out, out


def test_an_ingress_page_is_found_by_its_ingress_never_by_host() -> None:
    from reconciler.render import Renderer
    from tests.test_tls import desired_of

    pattern = ("name: vms\nrules:\n  - match: {hostname: '{vm}.apps.test'}\n    target: {instance: '{vm}', port: 1}\n"
               'error_pages:\n  "503": {html: "<p>vms</p>"}\n')
    exact = "name: other\nrules:\n  - match: {hostname: other.apps.test}\n    target: {instance: o, port: 1}\n"
    config = Renderer(Settings())(desired_of([pattern, exact], Settings()))
    server = config["apps"]["http"]["servers"]["ingress-80"]
    text = str(server["errors"]["routes"])
    assert "'{http.vars.ingress}': ['vms']" in text and "apps.test" not in text
    routes = {r.get("@id"): r for r in server["routes"]}
    assert routes["ingress.vms.rule-0"]["handle"][0]["ingress"] == "vms"
    assert "ingress" not in str(routes["ingress.other.rule-0"]["handle"][0])
