"""The API's credentials: ``Authorization: Bearer <token>``, or HTTP Basic with the token as the password
(any user name) -- what a browser sends after its login prompt, for the dashboard. Both are compared in
constant time. A 401 of the dashboard asks for Basic (the browser then prompts, and sends the credentials
it keeps for the realm to the dashboard's later requests); a 401 elsewhere asks for Bearer, as before.
"""

from __future__ import annotations

import base64
import binascii
import hmac

REALM = "hypeman-ingress"

#: where a 401 asks for Basic credentials: the dashboard (:mod:`reconciler.api.ui`)
UI_PREFIX = "/ui"


def authorized(header: str, token: bytes) -> bool:
    """``header`` (an ``Authorization`` value) carries ``token``, as Bearer or as a Basic password."""
    scheme, _, given = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return hmac.compare_digest(given.strip().encode(), token)
    if scheme == "basic":
        return hmac.compare_digest(basic_password(given.strip()), token)
    return False


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
