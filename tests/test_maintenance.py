"""Maintenance mode (issue 16, part 3): ``maintenance: {message, retry_after, allow_path}`` on an ingress
answers 503 with ``Retry-After`` and the message -- an HTML page to clients that accept HTML, plain text
to others -- while ``allow_path`` still reaches the instance; switching it on and off is a manifest change
like any other, and other hosts do not notice (0 failed requests with traffic flowing).
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from reconciler.render import Renderer
from reconciler.settings import Settings
from tests.helpers import Backend, Daemon, Flow, free_port, instance_yaml, wait_for, write
from tests.test_tls import desired_of

SETTINGS = Settings()


def site(port: int, listen: int, maintenance: str = "") -> str:
    return (f"name: site\nrules:\n  - match: {{hostname: site.test, port: {listen}}}\n"
            f"    target: {{instance: web, port: {port}}}\n" + maintenance)


def test_the_message_is_escaped_for_html_and_for_caddy() -> None:
    text = site(1, 80, "maintenance: {message: '<b>back at {env.HOME} 5pm</b> & soon', retry_after: 120}\n")
    routes = Renderer(SETTINGS)(desired_of([text], SETTINGS))["apps"]["http"]["servers"]["ingress-80"]["routes"]
    (sub,) = routes[0]["handle"]
    page, plain = sub["routes"]
    body = page["handle"][0]["body"]
    assert "&lt;b&gt;back at \\{env.HOME\\} 5pm&lt;/b&gt; &amp; soon" in body and "<b>" not in body
    assert page["handle"][0]["headers"]["Retry-After"] == ["120"]
    assert plain["handle"][0]["body"] == "503 Service Unavailable: <b>back at \\{env.HOME\\} 5pm</b> & soon\n"


def test_maintenance_on_and_off_with_traffic_flowing(daemon_factory: Callable[..., Daemon],
                                                    backends: Callable[[str], Backend]) -> None:
    web, other = backends("web"), backends("other")
    port = free_port()
    d = daemon_factory()
    write(d.instances / "vms.yaml", instance_yaml("web") + "---\n" + instance_yaml("other"))
    path = d.manifests[0] / "site.yaml"
    write(path, site(web.port, port))
    write(d.manifests[0] / "other.yaml", f"name: other\nrules:\n  - match: {{hostname: other.test, port: {port}}}\n"
                                         f"    target: {{instance: other, port: {other.port}}}\n")
    d.start()
    url = f"http://127.0.0.1:{port}"

    def get(path: str = "/", accept: str = "*/*") -> httpx.Response:
        return httpx.get(url + path, headers={"Host": "site.test", "Accept": accept}, timeout=5)

    wait_for(lambda: get().status_code == 200, timeout=15, message="site routed")
    with Flow(port, "other.test") as flow:
        wait_for(lambda: flow.seen["backend=other"] >= 50, timeout=15, message="traffic on the other host")
        write(path, site(web.port, port, "maintenance: {message: Upgrading the database., retry_after: 600, "
                                         "allow_path: /healthz}\n"))
        wait_for(lambda: get().status_code == 503, timeout=15, message="maintenance on")
        plain = get()
        assert plain.headers["Retry-After"] == "600" and plain.text == (
            "503 Service Unavailable: Upgrading the database.\n")
        page = get(accept="text/html,application/xhtml+xml")
        assert page.status_code == 503 and page.headers["Content-Type"].startswith("text/html")
        assert "<p>Upgrading the database.</p>" in page.text
        health = get("/healthz/ready")
        assert health.status_code == 200 and health.text.startswith("backend=web ")  # still reaches the instance
        st = httpx.get(f"{d.api_url}/ingresses/site", timeout=5).json()
        assert st["maintenance"] == {"message": "Upgrading the database.", "retry_after": 600,
                                     "allow_path": "/healthz"}
        assert "in maintenance: requests answer 503 (Retry-After: 600 s)" in st["status"]["message"]
        write(path, site(web.port, port))
        wait_for(lambda: get().status_code == 200, timeout=15, message="maintenance off")
        seen = flow.seen["backend=other"]
        wait_for(lambda: flow.seen["backend=other"] >= seen + 50, timeout=15, message="more traffic")
    assert flow.failures == [], flow.failures[:5]


def test_the_readme_example_is_valid() -> None:
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml", readme.index("### Maintenance mode")) + len("```yaml")
    desired = desired_of([readme[start:readme.index("```", start)]], SETTINGS)
    assert not desired.problems, desired.problems
    m = desired.ingresses[0].ingress.maintenance
    assert m is not None and m.retry_after == 600 and m.allow_path == "/healthz"
