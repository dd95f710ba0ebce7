"""The API's credentials: ``Authorization: Bearer <token>``, or HTTP Basic with the token as the password
(any user name) -- what a browser sends after its login prompt, for the dashboard. Both are compared in
constant time. A 401 of the dashboard asks for Basic (the browser then prompts, and sends the credentials
it keeps for the realm to the dashboard's later requests); a 401 elsewhere asks for Bearer, as before.

A browser sends the Basic credentials it keeps *by itself*, also with a request another web page makes
(cross-site request forgery), so Basic only reads (GET, HEAD: the dashboard never writes); and a write
that a browser says comes from another origin (``Origin``, ``Sec-Fetch-Site``) is refused whatever its
credentials -- with no token configured as well. API clients (curl, hypeman) send neither header.
"""

from __future__ import annotations

import base64
import binascii
import hmac

REALM = "hypeman-ingress"

#: where a 401 asks for Basic credentials: the dashboard (:mod:`reconciler.api.ui`)
UI_PREFIX = "/ui"


#: the methods Basic credentials may be used for (a browser sends them along with forged requests too)
READS = frozenset({"GET", "HEAD"})


def authorized(header: str, token: bytes, method: str = "GET") -> bool:
    """``header`` (an ``Authorization`` value) carries ``token``, as Bearer or -- for a read -- as a Basic
    password."""
    scheme, _, given = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return hmac.compare_digest(given.strip().encode(), token)
    if scheme == "basic" and method.upper() in READS:
        return hmac.compare_digest(basic_password(given.strip()), token)
    return False


def cross_origin_write(method: str, host: str | None, origin: str | None, fetch_site: str | None) -> str | None:
    """Why a write is refused as coming from a web page of another origin (None: it is not): the browser's
    ``Sec-Fetch-Site`` says cross-site or same-site, or its ``Origin`` is not this API's own."""
    if method.upper() in READS or method.upper() == "OPTIONS":
        return None
    if fetch_site is not None and fetch_site.strip().lower() in ("cross-site", "same-site"):
        return f"a {method} from a web page of another site (Sec-Fetch-Site: {fetch_site.strip()[:20]})"
    if origin is not None:
        _scheme, sep, authority = origin.strip().partition("://")
        if not sep or host is None or authority.lower() != host.strip().lower():
            return f"a {method} from a web page of another origin (Origin: {origin.strip()[:100]})"
    return None


def basic_password(credentials: str) -> bytes:
    """The password of Basic ``credentials`` (base64 of ``user:password``, RFC 7617); empty when they are
    not that."""
    try:
        raw = base64.b64decode(credentials.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return b""
    _user, colon, password = raw.partition(b":")
    return password if colon else b""


def refusal(path: str) -> tuple[str, str]:
    """The message and the ``WWW-Authenticate`` challenge of a 401 for ``path``."""
    if path == UI_PREFIX or path.startswith(UI_PREFIX + "/"):
        return ("missing or invalid credentials: log in with any user name and the API token as the password",
                f'Basic realm="{REALM}", charset="UTF-8"')
    return "missing or invalid bearer token", "Bearer"
