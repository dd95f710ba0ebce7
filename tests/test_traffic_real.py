"""Traffic observability against the real Caddy: per-ingress series on our /metrics, access log files per
ingress with credentials redacted, rotation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Backend, Daemon, free_port, ingress_yaml, instance_yaml, wait_for, write
from tests.test_observability import dashboard_metric_names

SECRETS = {"Authorization": "Bearer s3cr3t-authz", "Cookie": "session=s3cr3t-cookie",
           "X-Api-Key": "s3cr3t-apikey", "X-Auth-Token": "s3cr3t-authtoken", "X-Team-Secret": "s3cr3t-custom",
           "Proxy-Authorization": "Basic s3cr3t-proxy"}
QUERY_SECRET = "s3cr3t-query"


def totals(text: str, sample: str, **match: str) -> dict[str, float]:
    """``sample``'s values summed by ingress, over the series whose labels include ``match``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in match.items()):
                out[s.labels["ingress"]] = out.get(s.labels["ingress"], 0.0) + s.value
    return out


def scrape(d: Daemon) -> str:
    r = httpx.get(f"{d.api_url}/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


@pytest.mark.parametrize("bucketed", [False, True], ids=["routes", "bucketed"])
def test_per_ingress_metrics_and_access_logs(bucketed: bool, daemon_factory: Callable[..., Daemon],
                                             backends: Callable[[str], Backend], tmp_path: Path) -> None:
    """With a route per host, and with the bucketed layout of large nodes (threshold 0: every host in a
    bucket), where Caddy must still know every host for its per-host guard."""
    backend = backends("a")
    port = free_port()
    d = daemon_factory(env={"HYPEMAN_BUCKET_THRESHOLD": "0" if bucketed else "256",
                            "HYPEMAN_ACCESS_LOG_ROLL_MB": "1", "HYPEMAN_ACCESS_LOG_ROLL_KEEP": "2",
                            "HYPEMAN_ACCESS_LOG_REDACT_HEADERS": "X-Team-Secret"})
    src = d.manifests[0]
    write(src / "one.yaml", "access_log: true\n" + ingress_yaml("one", "one.example.com", port, "vm", backend.port))
    write(src / "two.yaml", "access_log: true\n" + ingress_yaml("two", "two.example.com", port, "vm", backend.port))
    write(src / "broken.yaml", ingress_yaml("broken", "broken.example.com", port, "ghost", backend.port))
    write(d.instances / "vm.yaml", instance_yaml("vm"))
    d.start()
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=10) as client:
        wait_for(lambda: client.get(f"{url}/", headers={"Host": "two.example.com"}).status_code == 200,
                 message="two routed")  # (one request to two, before the counted ones)
        sent = {"one": 3, "two": 2, "broken": 2}
        for name, n in sent.items():
            for i in range(n):
                r = client.get(f"{url}/p{i}?token={QUERY_SECRET}&page={i}",
                               headers={"Host": f"{name}.example.com", **SECRETS})
                assert r.status_code == (503 if name == "broken" else 200), r.text
    sent["two"] += 1

    # our /metrics: Caddy's series with the ingress label, the counts of each ingress (cached <= 2 s)
    text = ""

    def counted() -> bool:
        nonlocal text
        text = scrape(d)
        return totals(text, "caddy_http_requests_total") == sent
    wait_for(counted, timeout=15, message="per-ingress request counts on /metrics")
    assert "hypeman_ingress_traffic_scrape_up 1.0" in text
    assert totals(text, "caddy_http_request_errors_total") == {"broken": 2}
    assert totals(text, "caddy_http_request_duration_seconds_count", code="200") == {"one": 3, "two": 3}
    errors = totals(text, "caddy_http_request_duration_seconds_count")
    assert errors["broken"] == 2 and totals(text, "caddy_http_request_duration_seconds_count", code="200").get(
        "broken") is None  # (counted as the proxy's 502: the error route then answers 503)
    assert totals(text, "caddy_http_request_duration_seconds_bucket", le="+Inf")["one"] == 3
    assert set(dashboard_metric_names()) <= {s.name for f in text_string_to_metric_families(text) for s in f.samples}

    # access logs: one JSON file per logged ingress, its own requests only, no secret anywhere
    logs = d.data_dir / "logs" / "access"
    wait_for(lambda: len((logs / "one.log").read_text().splitlines()) == 3 if (logs / "one.log").exists() else False,
             message="one's access log lines")
    assert sorted(p.name for p in logs.iterdir()) == ["one.log", "two.log"]  # broken does not log
    for name, count in (("one", 3), ("two", 3)):
        raw = (logs / f"{name}.log").read_bytes()
        for secret in [*SECRETS.values(), QUERY_SECRET]:
            assert secret.split()[-1].split("=")[-1].encode() not in raw, (name, secret)
        lines = [json.loads(line) for line in raw.decode().splitlines()]
        assert len(lines) == count
        assert {line["request"]["host"] for line in lines} == {f"{name}.example.com"}
        assert {line["logger"] for line in lines} == {f"http.log.access.{name}"}
        with_secrets = [line for line in lines if "token=" in line["request"]["uri"]]
        assert len(with_secrets) == sent[name] - (name == "two")  # (not the first request to two)
        for line in with_secrets:
            headers = line["request"]["headers"]
            for header in SECRETS:
                assert headers[header] in ("REDACTED", ["REDACTED"]), (header, headers[header])
        assert (logs / f"{name}.log").stat().st_mode & 0o777 == 0o600
    assert "token=REDACTED&page=0" in (logs / "one.log").read_text()
    assert "http.log.access" not in d.caddy_log.read_text()  # Caddy's own log has no access lines

    # rotation: configured from the settings, and a file rolls at its size
    config = json.loads((d.data_dir / "caddy" / "config.json").read_text())
    writer = config["logging"]["logs"]["access-one"]["writer"]
    assert (writer["roll_size_mb"], writer["roll_keep"], writer["roll_keep_days"]) == (1, 2, 14)
    with httpx.Client(timeout=10) as client:
        for i in range(200):  # ~8 KB a line: 1 MB in ~130 requests
            r = client.get(f"{url}/{'x' * 8000}{i}", headers={"Host": "one.example.com"})
            assert r.status_code == 200, r.status_code
    wait_for(lambda: len(list(logs.glob("one-*.log.gz"))) >= 1, message="one.log rolled (gzipped)")
    assert (logs / "one.log").stat().st_size < 1024 * 1024
