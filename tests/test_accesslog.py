"""Per-ingress access logs: the manifest field, the settings, and what the renderer makes of them (pure)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from reconciler.accesslog import QUERY_SECRET, REDACTED, logged
from reconciler.api.writer import ingress_body
from reconciler.errors import ConfigError
from reconciler.model import Document, Ingress, Origin
from reconciler.parse import parse_documents
from reconciler.render import Renderer, render
from reconciler.settings import Settings
from reconciler.validate import ingress_from_document, resolve
from tests.test_render import m, r


def ingress(text: str, index: int = 0) -> Ingress:
    (p,) = parse_documents(text)
    ing, problems = ingress_from_document(Document(Origin(0, f"f{index}.yaml", 0, f"f{index}.yaml", p.line), p))
    assert ing is not None, problems
    return ing


def config(ingresses: list[Ingress], settings: Settings) -> dict[str, Any]:
    return render(resolve(ingresses, [], settings, []), settings)


LOGGED = "access_log: true\n" + m("logged", r("logged.example.com", 80, "web"))
QUIET = m("quiet", r("quiet.example.com", 80, "web"))
OFF = "access_log: false\n" + m("silent", r("silent.example.com", 80, "web"))


@pytest.mark.parametrize(("mode", "said", "expected"), [
    ("off", True, False), ("off", None, False), ("opt-in", True, True), ("opt-in", None, False),
    ("opt-in", False, False), ("all", None, True), ("all", False, False), ("all", True, True)])
def test_who_logs(mode: str, said: bool | None, expected: bool) -> None:
    assert logged(said, mode) is expected


def test_the_manifest_field_is_optional_and_boolean() -> None:
    assert ingress(LOGGED).access_log is True
    assert ingress(OFF).access_log is False
    assert ingress(QUIET).access_log is None
    (p,) = parse_documents("access_log: yes please\n" + QUIET)
    ing, problems = ingress_from_document(Document(Origin(0, "x.yaml", 0, "x.yaml", p.line), p))
    assert ing is None and "access_log" in problems[0].message
    assert ingress_body(ingress(LOGGED))["access_log"] is True
    assert "access_log" not in ingress_body(ingress(QUIET))


@pytest.mark.parametrize(("mode", "files"), [("opt-in", {"logged"}), ("all", {"logged", "quiet"}), ("off", set())])
def test_modes_choose_the_logged_ingresses(mode: str, files: set[str]) -> None:
    settings = Settings(data_dir="/d", access_logs=mode)
    cfg = config([ingress(LOGGED, 0), ingress(QUIET, 1), ingress(OFF, 2)], settings)
    logs = cfg.get("logging", {}).get("logs", {})
    assert {k.removeprefix("access-") for k in logs if k != "default"} == files
    for name in files:
        log = logs[f"access-{name}"]
        assert log["writer"]["filename"] == f"/d/logs/access/{name}.log"
        assert log["writer"]["roll_size_mb"] == 100 and log["writer"]["roll_keep"] == 5
        assert log["include"] == [f"http.log.access.{name}"]
    server = cfg["apps"]["http"]["servers"]["ingress-80"]
    if files:
        assert logs["default"] == {"exclude": ["http.log.access"]}
        assert server["logs"] == {"logger_names": {f"{n}.example.com": [n] for n in sorted(files)},
                                  "skip_unmapped_hosts": True}
    else:
        assert "logging" not in cfg and "logs" not in server


def test_turning_a_log_on_renders_it_also_where_the_renderer_would_patch() -> None:
    settings = Settings(data_dir="/d")
    renderer = Renderer(settings)
    quiet, other = ingress(QUIET, 0), ingress(m("other", r("other.example.com", 80, "web")), 1)
    first = renderer(resolve([quiet, other], [], settings, []))
    assert "logging" not in first
    now = dataclasses.replace(quiet, access_log=True)
    second = renderer(resolve([now, other], [], settings, []))
    assert second == config([now, other], settings)
    assert second["apps"]["http"]["servers"]["ingress-80"]["logs"]["logger_names"] == {"quiet.example.com": ["quiet"]}


def test_metrics_per_host_follow_the_setting() -> None:
    assert config([], Settings())["apps"]["http"]["metrics"] == {"per_host": True}
    assert "metrics" not in config([], Settings(traffic_metrics=False))["apps"]["http"]


def test_settings_from_env() -> None:
    s = Settings.from_env({"HYPEMAN_ACCESS_LOGS": "ALL", "HYPEMAN_TRAFFIC_METRICS": "false",
                           "HYPEMAN_ACCESS_LOG_ROLL_MB": "7",
                           "HYPEMAN_ACCESS_LOG_REDACT_HEADERS": "x-my-token, Authorization"})
    assert (s.access_logs, s.traffic_metrics, s.access_log_roll_mb) == ("all", False, 7)
    redacted = s.access_log_redact_headers
    assert "X-My-Token" in redacted and redacted.count("Authorization") == 1
    defaults = Settings.from_env({})
    assert defaults.access_logs == "opt-in" and defaults.traffic_metrics
    with pytest.raises(ConfigError, match="HYPEMAN_ACCESS_LOGS"):
        Settings.from_env({"HYPEMAN_ACCESS_LOGS": "sometimes"})
    with pytest.raises(ConfigError, match="HYPEMAN_ACCESS_LOG_REDACT_HEADERS"):
        Settings.from_env({"HYPEMAN_ACCESS_LOG_REDACT_HEADERS": "bad header"})


@pytest.mark.parametrize(("uri", "expected"), [
    ("/a?token=s3cr3t&x=1", f"/a?token={REDACTED}&x=1"),
    ("/a?x=1&API_KEY=s3cr3t#frag", f"/a?x=1&API_KEY={REDACTED}#frag"),
    ("/a?access_token=s3cr3t", f"/a?access_token={REDACTED}"),
    ("/a?monkey=banana&page=2", "/a?monkey=banana&page=2"),  # "key" only as a name's start
    ("/token=path?q=1", "/token=path?q=1"),
    ("/a?api-key=s3cr3t&apikey=s3cr3t", f"/a?api-key={REDACTED}&apikey={REDACTED}"),  # any separator
    ("/a?access-token=s3cr3t", f"/a?access-token={REDACTED}"),
    ("/o?X-Goog-Signature=s3cr3t&X-Goog-Credential=c", f"/o?X-Goog-Signature={REDACTED}&X-Goog-Credential={REDACTED}"),
    ("/o?X-Amz-Security-Token=s3cr3t", f"/o?X-Amz-Security-Token={REDACTED}"),
])
def test_query_secrets_are_redacted(uri: str, expected: str) -> None:
    # Go's RE2 and Python's re agree on this pattern (no lookarounds, (?i) flag first)
    assert re.sub(QUERY_SECRET, r"\g<1>" + REDACTED, uri) == expected
