"""Fleet mode: several nodes read one git source, share one certificate storage, converge to the same config
(the node-neutral config hash) and make one ACME order per name; their API is read-only.

Unit tests for the settings, the hash and the writer's refusal; one end-to-end test with two real daemons
(own data dirs, own loopback addresses, the same ports), one git-sync style checkout, one shared storage
dir and a real Pebble counting the orders.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler import __version__
from reconciler.api.writer import ManifestWriter, Refusal, Refused
from reconciler.app import shared_storage_ready
from reconciler.errors import ConfigError
from reconciler.fleet import config_hash, node_tokens
from reconciler.render import ConfigEncoder, Renderer, admin_block
from reconciler.settings import Settings
from reconciler.sources.dirs import sources_for
from reconciler.statustable import node_lines
from tests.helpers import Daemon, free_port, instance_yaml, scrubbed_environ, wait_for, write
from tests.pebble import Pebble, https_get, missing_reason, require_pebble
from tests.test_tls import desired_of, manifest, rule, tls_env

FLEET_ENV = {"HYPEMAN_FLEET": "true", "HYPEMAN_MANIFESTS": "/srv/git/current"}


# -- settings ---------------------------------------------------------------------------------------------

def test_fleet_settings_are_read_and_checked() -> None:
    s = Settings.from_env({**FLEET_ENV, "HYPEMAN_TLS_STORAGE_DIR": "/mnt/certs/", "HYPEMAN_NODE_NAME": "edge-1",
                           "ACME_EMAIL": "ops@example.com"})
    assert (s.fleet, s.tls_storage_dir, s.storage_dir, s.shared_storage, s.node_name) == (
        True, "/mnt/certs", "/mnt/certs", True, "edge-1")
    plain = Settings.from_env({"HYPEMAN_DATA_DIR": "/var/lib/x"})
    assert (plain.fleet, plain.storage_dir, plain.shared_storage, plain.node_name) == (
        False, "/var/lib/x/caddy/data", False, None)
    long_name = "ip-10-0-0-1." + "a" * 200 + ".compute.internal"  # a Kubernetes node name may be that long
    assert Settings.from_env({"HYPEMAN_NODE_NAME": long_name}).node_name == long_name


@pytest.mark.parametrize(("env", "needle"), [
    ({"HYPEMAN_FLEET": "true"}, "HYPEMAN_FLEET=true needs a manifest source"),
    ({**FLEET_ENV, "ACME_EMAIL": "ops@example.com"}, "needs HYPEMAN_TLS_STORAGE_DIR"),
    ({"HYPEMAN_TLS_STORAGE_DIR": "certs"}, "HYPEMAN_TLS_STORAGE_DIR='certs' is not an absolute path"),
    ({"HYPEMAN_NODE_NAME": "edge 1"}, "HYPEMAN_NODE_NAME='edge 1' is not a node name"),
    ({"HYPEMAN_NODE_NAME": "n" * 254}, "at most 253 characters"),
    ({"HYPEMAN_FLEET": "maybe"}, "HYPEMAN_FLEET='maybe' is not a boolean"),
])
def test_bad_fleet_settings_fail_naming_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert needle in str(info.value)


def test_fleet_with_the_internal_issuer_needs_no_shared_storage() -> None:
    assert Settings.from_env({**FLEET_ENV, "TLS_ISSUER": "internal"}).storage_dir.endswith("caddy/data")


def test_a_fleet_node_reads_git_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "ingresses").mkdir(parents=True)
    single = Settings(data_dir=str(data), manifest_dirs=("/srv/git/current",))
    assert [s.path for s in sources_for(single)] == ["/srv/git/current", str(data / "ingresses")]
    fleet = Settings(data_dir=str(data), manifest_dirs=("/srv/git/current",), fleet=True)
    assert [s.path for s in sources_for(fleet)] == ["/srv/git/current"]


def test_the_writer_refuses_every_write_on_a_fleet_node(tmp_path: Path) -> None:
    settings = Settings(data_dir=str(tmp_path / "data"), manifest_dirs=(str(tmp_path / "git"),), fleet=True)
    writer = ManifestWriter(settings, validate_config=lambda config: None)
    body = {"name": "web", "rules": [{"match": {"hostname": "web.test"}, "target": {"instance": "w", "port": 80}}]}
    for call in (lambda: writer.create(body), lambda: writer.delete("web")):
        with pytest.raises(Refused) as info:
            call()
        assert info.value.code == Refusal.FLEET_READ_ONLY
        assert "HYPEMAN_FLEET=true" in info.value.message and str(tmp_path / "git") in info.value.message
    assert not (tmp_path / "data" / "ingresses").exists()


# -- the config hash ----------------------------------------------------------------------------------------

MANIFESTS = [manifest("app", rule("app.test", 8443, "web", 8080, tls=True, redirect=True)),
             manifest("api", rule("api.test", 9000, "web", 8081))]


def node_settings(**values: Any) -> Settings:
    base: dict[str, Any] = {"data_dir": "/var/lib/hypeman", "http_port": 8080, "https_port": 8443,
                            "tls_storage_dir": "/mnt/certs", "listen_address": "10.0.0.1"}
    s = Settings(**{**base, **values})
    return Settings.from_env({"ACME_EMAIL": "ops@example.com", "ACME_CA": "https://127.0.0.1:14000/dir"},
                             **{k: getattr(s, k) for k in (*base, *values)})


def hash_of(settings: Settings, manifests: list[str] = MANIFESTS) -> tuple[str, bytes]:
    body = ConfigEncoder()(Renderer(settings)(desired_of(manifests, settings)))
    return config_hash(body, node_tokens(settings)), body


def test_nodes_with_their_own_addresses_and_data_dirs_hash_alike() -> None:
    """Each node listens on its own address (or every node on the wildcard: then Caddy's ACME challenge
    solvers get no ``bind_host``, a difference the hash shows)."""
    a, body_a = hash_of(node_settings())
    b, body_b = hash_of(node_settings(listen_address="10.0.0.2", admin_address="10.0.0.2", admin_port=3019,
                                      dns_address="10.0.0.2", dns_port=5399, api_listen="10.0.0.2:9190",
                                      data_dir="/data/node-b"))
    assert body_a != body_b  # the configs differ in exactly the node's own values ...
    assert b'"10.0.0.2:8443"' in body_b and b'"udp/10.0.0.2:5399"' in body_b and b'"10.0.0.2:3019"' in body_b
    assert a == b  # ... which the hash leaves out
    assert len(a) == 16 and int(a, 16) >= 0


@pytest.mark.parametrize("change", ["http_port", "manifest", "storage", "zone"])
def test_what_changes_routing_changes_the_hash(change: str) -> None:
    base, _ = hash_of(node_settings())
    if change == "http_port":
        other, _ = hash_of(node_settings(http_port=8081))
    elif change == "manifest":
        other, _ = hash_of(node_settings(), [*MANIFESTS[:1], manifest("api", rule("api.test", 9000, "web", 8082))])
    elif change == "storage":
        other, _ = hash_of(node_settings(tls_storage_dir="/mnt/other"))
    else:
        other, _ = hash_of(node_settings(dns_zone="vms.internal"))
    assert other != base


def test_the_status_table_names_the_node_and_its_hash() -> None:
    line = node_lines({"node": {"name": "edge-1", "version": "0.1.0", "fleet": True, "shared_storage": True,
                                "config_hash": "0123456789abcdef", "tls_storage": "/mnt/certs"}})
    assert line == ["node:           edge-1 (fleet node, hypeman-ingress 0.1.0), config hash 0123456789abcdef, "
                    "certificates in /mnt/certs (shared)"]
    assert node_lines({}) == []


# -- end to end: two nodes, one git source, one shared storage, a real Pebble -------------------------------

def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env)
    return done.stdout.strip()


class GitSync:
    """What the git-sync sidecar does: each commit checked out into its own dir named by its hash, then
    ``current`` swapped to it atomically (a symlink renamed over the old one)."""

    def __init__(self, root: Path) -> None:
        self.repo = root / "repo"
        self.root = root / "sync"
        self.repo.mkdir(parents=True)
        self.root.mkdir()
        git(self.repo, "init", "-q", "-b", "main")
        self.link = self.root / "current"

    def commit(self, files: dict[str, str], message: str) -> str:
        for name, text in files.items():
            write(self.repo / name, text)
        git(self.repo, "add", "-A")
        git(self.repo, "commit", "-q", "-m", message)
        sha = git(self.repo, "rev-parse", "HEAD")
        worktree = self.root / sha
        git(self.repo, "worktree", "add", "-q", "--detach", str(worktree), sha)
        tmp = self.root / ".current.tmp"
        tmp.symlink_to(worktree.name)
        os.replace(tmp, self.link)
        return sha


def status_of(d: Daemon) -> dict[str, Any]:
    resp = httpx.get(f"{d.api_url}/status", timeout=5)
    resp.raise_for_status()
    return dict(resp.json())


def ingress_of(d: Daemon, name: str) -> dict[str, Any] | None:
    return next((i for i in status_of(d).get("ingresses", []) if i["name"] == name), None)


def node_info(d: Daemon) -> dict[str, str]:
    text = httpx.get(f"{d.api_url}/metrics", timeout=5).text
    line = next(line for line in text.splitlines() if line.startswith("hypeman_ingress_node_info{"))
    labels = line[line.index("{") + 1:line.rindex("}")]
    return dict(_labels(labels))


def _labels(text: str) -> Iterator[tuple[str, str]]:
    """``a="x",b="y"`` (values without quotes or commas: names, hashes, revisions)."""
    for part in text.split(","):
        key, _, value = part.partition("=")
        yield key, value.strip('"')


def listening(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def pebble_for(tmp_path: Path) -> Iterator[Callable[..., Pebble]]:
    require_pebble(missing_reason())
    started: list[Pebble] = []

    def make(**kwargs: Any) -> Pebble:
        p = Pebble(tmp_path / "pebble", **kwargs)
        started.append(p)
        return p.start()

    yield make
    for p in started:
        p.stop()


@pytest.mark.caddy
def test_two_nodes_one_git_source_one_order_per_name(tmp_path: Path, pebble_for: Callable[..., Pebble],
                                                      daemon_factory: Callable[..., Daemon],
                                                      backends: Any) -> None:
    hp, tp = free_port(), free_port()
    addresses = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}
    # Pebble validates at node-a's address; an order node-b makes is answered there from the shared storage
    pebble = pebble_for(http_port=hp, tls_port=tp, answer_ip=addresses["node-a"])
    web = backends("web")
    sync = GitSync(tmp_path / "git")
    first = sync.commit({"app.yaml": manifest("app", rule("app.test", tp, "web", web.port, tls=True, redirect=True)),
                         "api.yaml": manifest("api", rule("api.test", tp, "web", web.port, tls=True))},
                        "two TLS ingresses")
    instances = tmp_path / "instances"
    write(instances / "web.yaml", instance_yaml("web"))
    shared = tmp_path / "shared-certs"
    nodes: dict[str, Daemon] = {}
    for name, ip in addresses.items():
        env = {**tls_env(ACME_EMAIL="test@example.com", ACME_CA=pebble.directory, ACME_CA_ROOT=pebble.ca_root,
                         ACME_CHALLENGES="http-01", CADDY_HTTP_PORT=hp, CADDY_HTTPS_PORT=tp),
               "CADDY_LISTEN_ADDRESS": ip, "CADDY_ADMIN_ADDRESS": ip, "HYPEMAN_DNS_ADDRESS": ip,
               "HYPEMAN_FLEET": "true", "HYPEMAN_TLS_STORAGE_DIR": str(shared), "HYPEMAN_NODE_NAME": name}
        nodes[name] = daemon_factory(manifests=[sync.link], instances=instances, data_dir=tmp_path / name / "data",
                                     env=env)
    # node-a first, until it listens (Pebble validates there; a real fleet's DNS names live nodes only), then
    # node-b: both want the two certificates at once and meet at the locks in the shared storage
    nodes["node-a"].start(wait_ready=False)
    wait_for(lambda: listening(addresses["node-a"], hp), timeout=30, message="node-a listening")
    nodes["node-b"].start(wait_ready=False)

    root = tmp_path / "pebble-root.pem"
    for name, d in nodes.items():
        for ingress in ("app", "api"):
            wait_for(lambda d=d, i=ingress: (ingress_of(d, i) or {}).get("ready"), timeout=60,  # type: ignore[misc]
                     message=f"{ingress} ready on {name}")
    root.write_text(pebble.root_pem())
    for name, ip in addresses.items():  # every node serves the certificate
        for host in ("app.test", "api.test"):
            resp = https_get(tp, host, "/x", cafile=root, address=ip)
            assert resp.status == 200 and resp.body.startswith("backend=web "), (name, host, resp.body)
    assert pebble.orders() == 2, pebble.log_text()  # one order per name across the fleet
    assert len(list(shared.rglob("*.crt"))) == 2
    for d in nodes.values():
        assert not list((d.data_dir / "caddy" / "data").rglob("*.crt"))  # nothing in a node's own storage

    def converged(commit: str) -> dict[str, dict[str, str]]:
        infos = {name: node_info(d) for name, d in nodes.items()}
        assert all(i["commit"] == commit and i["config_hash"] for i in infos.values()), infos
        return infos

    infos = wait_for(lambda: converged(first), timeout=20, message="both nodes report the first commit")
    assert infos["node-a"]["config_hash"] == infos["node-b"]["config_hash"]
    assert {i["node"] for i in infos.values()} == set(addresses) and all(i["fleet"] == "true" for i in infos.values())
    assert {i["version"] for i in infos.values()} == {__version__}
    configs = {name: httpx.get(f"http://{addresses[name]}:{d.admin_port}/config/", timeout=5).text
               for name, d in nodes.items()}
    assert configs["node-a"] != configs["node-b"]  # their own addresses differ ...

    def own_values_out(name: str) -> str:
        d, ip = nodes[name], addresses[name]
        text = configs[name].replace(f"{ip}:{d.admin_port}", "ADMIN")
        return text.replace(f"udp/{ip}:{d.env['HYPEMAN_DNS_PORT']}", "DNS").replace(ip, "ADDRESS")
    assert own_values_out("node-a") == own_values_out("node-b")  # ... and nothing else

    # a commit reaches both: a plain ingress added, the hash moves on both, equal again
    second = sync.commit({"plain.yaml": manifest("plain", rule("plain.test", hp, "web", web.port))}, "plain")
    infos2 = wait_for(lambda: converged(second), timeout=20, message="both nodes report the second commit")
    assert infos2["node-a"]["config_hash"] == infos2["node-b"]["config_hash"] != infos["node-a"]["config_hash"]
    for ip in addresses.values():
        resp2 = httpx.get(f"http://{ip}:{hp}/", headers={"Host": "plain.test"}, timeout=5)
        assert resp2.status_code == 200 and resp2.text.startswith("backend=web ")
    st = status_of(nodes["node-b"])
    assert st["node"] == {"name": "node-b", "version": __version__, "fleet": True, "tls_storage": str(shared),
                          "shared_storage": True, "config_hash": infos2["node-b"]["config_hash"]}
    assert st["revision"]["commits"] == {str(sync.link): second}
    assert pebble.orders() == 2  # nothing ordered again

    # the API is read-only, saying where changes go
    for d in nodes.values():
        created = httpx.post(f"{d.api_url}/ingresses", timeout=5, json={
            "name": "x", "rules": [{"match": {"hostname": "x.test"}, "target": {"instance": "web", "port": 80}}]})
        deleted = httpx.delete(f"{d.api_url}/ingresses/app", timeout=5)
        garbage = httpx.post(f"{d.api_url}/ingresses", timeout=5, content=b"not json")  # refused before reading
        for resp3 in (created, deleted, garbage):
            assert resp3.status_code == 409 and resp3.json()["code"] == "fleet_read_only", resp3.text
            assert "commit the change" in resp3.json()["message"]
        assert httpx.get(f"{d.api_url}/ingresses/app", timeout=5).status_code == 200


@pytest.mark.parametrize(("address", "origins"), [
    ("127.0.0.1", None), ("localhost", None), ("::1", None), ("0.0.0.0", None), ("10.0.0.2", None),
    ("127.0.0.2", ["127.0.0.2:2019"]), ("::ffff:127.0.0.3", None),
])
def test_admin_names_a_loopback_address_caddy_would_not_allow(address: str, origins: list[str] | None) -> None:
    """Caddy accepts only localhost, 127.0.0.1 and ::1 as the Host of a loopback admin listener by default:
    a node on 127.0.0.2 (several nodes on one host) must name its address, or Caddy refuses its requests."""
    assert admin_block(Settings(admin_address=address)).get("origins") == origins


def test_an_unwritable_shared_storage_stops_the_start_naming_the_variable(tmp_path: Path) -> None:
    """A certificate storage the service cannot write (left out of systemd's ReadWritePaths=, not mounted,
    a file in its way) is an error at start naming HYPEMAN_TLS_STORAGE_DIR and what to do -- not a Caddy
    that fails every order later."""
    in_the_way = tmp_path / "not-a-dir"
    in_the_way.write_text("")
    storage = in_the_way / "certs"
    with pytest.raises(ConfigError) as info:
        shared_storage_ready(str(storage))
    assert f"HYPEMAN_TLS_STORAGE_DIR={storage} is not writable" in str(info.value)
    assert "ReadWritePaths=" in str(info.value)
    fine = tmp_path / "certs"
    shared_storage_ready(str(fine))
    assert fine.is_dir() and (fine.stat().st_mode & 0o777) == 0o700 and not list(fine.iterdir())

    env = {**scrubbed_environ(), **FLEET_ENV, "HYPEMAN_MANIFESTS": str(tmp_path / "git"),
           "HYPEMAN_TLS_STORAGE_DIR": str(storage), "HYPEMAN_API_LISTEN": "off"}
    done = subprocess.run([sys.executable, "-m", "reconciler.cli", "run", "--data-dir", str(tmp_path / "data")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "configuration error: HYPEMAN_TLS_STORAGE_DIR=" in done.stderr
    assert not (tmp_path / "data" / "caddy").exists()  # nothing started
