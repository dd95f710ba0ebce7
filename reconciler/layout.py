"""Route layout of one server: flat for small configs, bucketed above a threshold. PURE.

Caddy evaluates a server's routes one after the other (~0.5 us each), so one route per host makes the
last of 50k hosts ~25 ms slower than the first, and provisioning 50k ``reverse_proxy`` handlers makes
``/load`` take seconds. Above ``threshold`` routes on a port, hosts are spread over ~sqrt(n) buckets by a
stable hash of the hostname. Each bucket is one route whose host matcher lists the bucket's hosts (Caddy
binary-searches large host lists), with a subroute holding:

1. a ``map`` from the exact host to its upstream (an instance name in the responder's zone) and the
   instance's name, and one ``reverse_proxy`` dialling that placeholder;
2. the bucket's other routes (503 for unavailable instances, redirects) as they are.

Hostnames are case-insensitive, and Caddy's host matchers treat them so, but a ``map`` compares exact
strings. A bucketed server's first route therefore lower-cases a ``Host`` that holds upper-case letters
(26 plain replacements in Caddy's ``headers`` handler, which sets the request's host); the map's inputs
are the lower-case names the manifests hold. (A case-insensitive regexp per host instead doubled Caddy's
own ``/load`` time at 10k hosts.) Backends of bucketed servers see the host lower-cased.

A request then costs a bounded number of route evaluations whatever the number of ingresses, and a
config holds one ``reverse_proxy`` per bucket instead of one per host.

Buckets are reused from the previous layout while their members are the same (shared dicts): callers
must treat the rendered config as read-only, as every caller here does.
"""

from __future__ import annotations

import json
import math
import string
import zlib
from typing import Any

UPSTREAM = "{hypeman.upstream}"
INSTANCE = "{hypeman.instance}"
#: the request variable naming the instance a request is proxied to (Caddy's error routes quote it)
INSTANCE_VAR = "instance"


def server_name(port: int) -> str:
    """The name of the Caddy server of a port (also the ``server`` label of Caddy's metrics)."""
    return f"ingress-{port}"


def literal(text: str) -> str:
    """Escape Caddy placeholders: manifest/instance text quoted in a value Caddy expands (an unescaped
    ``{env.SECRET}`` would be expanded by Caddy)."""
    return text.replace("{", "\\{").replace("}", "\\}")


def proxy_handlers(instance: str, dial: str, proxy: dict[str, Any]) -> list[dict[str, Any]]:
    """Name the instance for the error routes, then proxy to ``dial`` (``proxy``: the reverse_proxy
    handler's common fields -- transport, hold). ``instance`` is a Caddy value (escaped or placeholders)."""
    return [{"handler": "vars", INSTANCE_VAR: instance}, {**proxy, "upstreams": [{"dial": dial}]}]


def _simple(route: dict[str, Any], proxy: dict[str, Any]) -> tuple[str, str, str | None] | None:
    """(dial, instance, path group) of a route that only proxies to one fixed upstream with the common
    handler, matching its host alone (group None) or its host and a path, maybe stripping that prefix
    (the group: :func:`_group` of the path matcher and the stripped prefix); else None."""
    match = route.get("match")
    if not isinstance(match, list) or len(match) != 1 or not isinstance(match[0], dict):
        return None
    keys = set(match[0])
    if keys not in ({"host"}, {"host", "path"}):
        return None
    handle = route.get("handle")
    if not isinstance(handle, list) or len(handle) not in (2, 3):
        return None
    strip: str | None = None
    if len(handle) == 3:
        rewrite = handle[1]
        if set(rewrite) != {"handler", "strip_path_prefix"} or rewrite["handler"] != "rewrite":
            return None
        strip = rewrite["strip_path_prefix"]
    var, h = handle[0], handle[-1]
    if set(var) != {"handler", INSTANCE_VAR} or var["handler"] != "vars":
        return None
    ups = h.get("upstreams")
    if not isinstance(ups, list) or len(ups) != 1 or {**h, "upstreams": None} != {**proxy, "upstreams": None}:
        return None
    dial, instance = ups[0].get("dial"), var[INSTANCE_VAR]
    if not isinstance(dial, str) or "{" in dial or not isinstance(instance, str):
        return None
    paths = match[0].get("path")
    if paths is None:
        return (dial, instance, None) if strip is None else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        return None
    return dial, instance, _group(paths, strip)


def _group(paths: list[str], strip: str | None) -> str:
    """The key of a path group of a bucket: the hosts proxied alike for one path matcher."""
    return json.dumps([paths, strip])


def _exact(host: str, dial: str, instance: str) -> dict[str, Any]:
    return {"input": host, "outputs": [dial, instance]}


def lowercase_host_route(port: int) -> dict[str, Any]:
    """The first route of a bucketed server: a ``Host`` holding upper-case letters is lower-cased (not
    terminal: the request then goes on to the buckets, whose maps hold lower-case names)."""
    return {"@id": f"lowercase-host.{port}", "match": [{"header_regexp": {"Host": {"pattern": "[A-Z]"}}}],
            "handle": [{"handler": "headers", "request": {"replace": {"Host": [
                {"search": c, "replace": c.lower()} for c in string.ascii_uppercase]}}}]}


def _proxy_if(proxy: dict[str, Any], paths: list[str] | None = None, strip: str | None = None) -> dict[str, Any]:
    """Proxy to the upstream a ``map`` found (none: the request goes on); for a path group, on its paths
    only, stripping its prefix when asked."""
    handle = proxy_handlers(INSTANCE, UPSTREAM, proxy)
    if strip is not None:
        handle = [handle[0], {"handler": "rewrite", "strip_path_prefix": strip}, *handle[1:]]
    match: dict[str, Any] = {"not": [{"vars": {UPSTREAM: [""]}}]}
    if paths is not None:
        match = {"path": paths, **match}
    return {"match": [match], "handle": handle, "terminal": True}


def _host_map(members: list[tuple[str, str, str]]) -> dict[str, Any]:
    return {"handler": "map", "source": "{http.request.host}", "destinations": [UPSTREAM, INSTANCE],
            "mappings": [_exact(h, d, i) for h, d, i in members], "defaults": ["", ""]}


def bucket_count(n: int) -> int:
    """A power of two near sqrt(n): stable across small changes of n, so buckets keep their members."""
    return 1 << max(1, round(math.log2(max(2.0, math.sqrt(n)))))


def bucket_of(hostname: str, buckets: int) -> int:
    return zlib.crc32(hostname.encode()) % buckets


#: (host, upstream, instance, None) for a plain proxy, (host, upstream, instance, path group) for a plain
#: proxy of one path, (host, None, None, route as JSON) for the others
Member = tuple[str, str | None, str | None, str | None]


def member(hostname: str, route: dict[str, Any], proxy: dict[str, Any]) -> Member:
    """What a bucket needs of one route: (host, upstream, instance, its path group or None) -- or the whole
    route as JSON, for the rare others. A bucket is a function of its members, so an unchanged bucket is
    reused from the last render."""
    simple = _simple(route, proxy)
    if simple is not None:
        return (hostname, *simple)
    return (hostname, None, None, json.dumps(route, sort_keys=True))


#: (port, bucket index) -> (its members, its route): the buckets of the previous layout, for reuse
Buckets = dict[tuple[int, int], tuple[tuple[Member, ...], dict[str, Any]]]


#: bucket index -> (the indices of its entries, the index of its route): where each entry went
Placement = dict[int, tuple[list[int], int]]


def layout(entries: list[tuple[str, dict[str, Any] | None]], *, port: int, threshold: int, proxy: dict[str, Any],
           members: list[Member] | None = None, previous: Buckets | None = None,
           kept: Buckets | None = None, placement: Placement | None = None) -> list[dict[str, Any]]:
    """Routes for ``entries`` (hostname, route), already sorted; a hostname more than once only for rules of
    its paths (they go to one bucket, by hostname). ``members``: the
    :func:`member` of each entry when the caller has them already (then a simple route may be None: a
    bucket needs only its member). ``previous``: the buckets of the last layout, reused when their
    members are the same; ``kept`` receives the buckets of this one, ``placement`` where each entry went
    (bucketed layouts only)."""
    if len(entries) <= threshold:
        out = [route for _, route in entries]
        assert all(r is not None for r in out), "flat layouts need every route"
        return out  # type: ignore[return-value]
    if members is None:
        members = [member(h, r, proxy) for h, r in entries if r is not None]
    n = bucket_count(len(entries))
    groups: list[list[Member]] = [[] for _ in range(n)]
    where: list[list[int]] = [[] for _ in range(n)]
    for i, m in enumerate(members):
        k = bucket_of(m[0], n)
        groups[k].append(m)
        where[k].append(i)
    routes: list[dict[str, Any]] = [lowercase_host_route(port)]
    for k, group in enumerate(groups):
        if not group:
            continue
        mine = tuple(group)
        hit = previous.get((port, k)) if previous is not None else None
        bucket = hit[1] if hit is not None and hit[0] == mine else bucket_route(port, k, mine, proxy)
        if kept is not None:
            kept[(port, k)] = (mine, bucket)
        if placement is not None:
            placement[k] = (where[k], len(routes))
        routes.append(bucket)
    return routes


def _paths(route: dict[str, Any]) -> list[str] | None:
    match = route.get("match")
    if isinstance(match, list) and match and isinstance(match[0], dict):
        paths = match[0].get("path")
        return paths if isinstance(paths, list) else None
    return None


def _path_order(paths: list[str], route_id: str = "") -> tuple[int, int, str, str]:
    """The place in a bucket of what matches ``paths``: Exact (one path) before Prefix (the path and
    ``path/*``), longer before shorter, then by path and route id (never by member order)."""
    exact = len(paths) == 1
    return (0 if exact else 1, -len(paths[0]), paths[0], route_id)


def bucket_route(port: int, k: int, members: tuple[Member, ...], proxy: dict[str, Any]) -> dict[str, Any]:
    """The route of bucket ``k`` of ``port`` holding ``members`` (a function of them and ``proxy``)."""
    simple = [(h, d, i) for h, d, i, r in members if d is not None and i is not None and r is None]
    grouped: dict[str, list[tuple[str, str, str]]] = {}
    for h, d, i, r in members:
        if d is not None and i is not None and r is not None:
            grouped.setdefault(r, []).append((h, d, i))
    others = [json.loads(r) for _, d, _, r in members if d is None and r is not None]
    # paths first -- a host's catch-all may be in the last map -- in Kubernetes' precedence: the plain
    # proxies of one path matcher as one map (the hosts that have it) and one proxy, other routes as they are
    with_path: list[tuple[tuple[int, int, str, str], list[dict[str, Any]]]] = []
    for key, hosts in grouped.items():
        paths, strip = json.loads(key)
        with_path.append((_path_order(paths),
                          [{"match": [{"path": paths}], "handle": [_host_map(hosts)]}, _proxy_if(proxy, paths, strip)]))
    with_path += [(_path_order(paths, str(r.get("@id", ""))), [r]) for r in others
                  if (paths := _paths(r)) is not None]
    sub: list[dict[str, Any]] = [r for _, routes in sorted(with_path, key=lambda item: item[0]) for r in routes]
    if simple:
        sub += [{"handle": [_host_map(simple)]}, _proxy_if(proxy)]
    sub += [r for r in others if _paths(r) is None]
    # a host with several paths has several members (in one bucket: buckets go by host); Caddy refuses a
    # host listed twice in one matcher
    return {"@id": f"bucket.{port}.{k}", "match": [{"host": list(dict.fromkeys(m[0] for m in members))}],
            "handle": [{"handler": "subroute", "routes": sub}]}
