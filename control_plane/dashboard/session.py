"""The dashboard's browser session: the admin token typed once into the sign-in form
becomes a cookie that a browser sends to the dashboard's own pages and nothing else.

The cookie holds an expiry and an HMAC of it keyed by the admin token, never the token:
it cannot be turned back into one, it works on every replica that has the same token, and
changing the token ends every session. It is ``HttpOnly`` (no script reads it),
``SameSite=Strict`` (no other site's page makes a browser send it) and scoped to
:data:`COOKIE_PATH`; the dashboard accepts it for ``GET`` only, and no other admin route
accepts it at all, so a cookie can never make a state-changing admin call.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

__all__ = ["COOKIE_NAME", "COOKIE_PATH", "SESSION_S", "issue", "valid"]

COOKIE_NAME = "llava_cp_dashboard"
COOKIE_PATH = "/admin/dashboard"
SESSION_S = 12 * 3600


def _mac(admin_token: str, expires: int) -> str:
    key = hashlib.sha256(b"llava-cp-dashboard-session\0" + admin_token.encode()).digest()
    return hmac.new(key, str(expires).encode(), hashlib.sha256).hexdigest()


def issue(admin_token: str, now: float | None = None, lifetime_s: int = SESSION_S) -> str:
    """A session cookie's value for ``admin_token``, good for ``lifetime_s``."""
    expires = int(time.time() if now is None else now) + lifetime_s
    return f"{expires}.{_mac(admin_token, expires)}"


def valid(admin_token: str, value: str | None, now: float | None = None) -> bool:
    """Whether ``value`` is an unexpired session of ``admin_token``."""
    if not admin_token or not value:
        return False
    expires_text, _, mac = value.partition(".")
    if not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    if expires < (time.time() if now is None else now):
        return False
    return secrets.compare_digest(mac, _mac(admin_token, expires))
