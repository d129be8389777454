"""Who may call the service's protected routes.

API calls send a key (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``). An ``<img>`` tag cannot send a
header, so every result carries its image URLs **signed**: ``?exp=<unix time>&sig=<HMAC>``, valid for one point
and a short while (``url_ttl_s``, 10 to 15 minutes by default). The signing key is derived from the first API key
(so replicas that share a key accept each other's URLs, and rotating the key ends them); expiry is rounded up to a
5-minute step so a page's thumbnail URLs stay the same between searches and the browser cache keeps working.
No keys: every route is open and URLs carry no signature.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Callable, Mapping, Sequence

from fastapi import HTTPException, Request

__all__ = ["Access", "check_key", "MISSING_KEY"]

MISSING_KEY = "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key'"

_SIGNING_LABEL = b"edje-qdrant signed image URL v1"


class Access:
    """API keys and signed image URLs."""

    def __init__(self, keys: Sequence[str] = (), *, url_ttl_s: int = 600, url_step_s: int = 300,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = [k.encode() for k in keys if k]
        self._signing = [hmac.new(k, _SIGNING_LABEL, hashlib.sha256).digest() for k in self._keys]
        self.url_ttl_s = url_ttl_s
        self.url_step_s = url_step_s
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def key_ok(self, headers: Mapping[str, str]) -> bool:
        """True when no key is needed, or the headers carry one of the keys."""
        if not self._keys:
            return True
        auth = headers.get("authorization", "")
        given = (auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")).encode()
        return any(hmac.compare_digest(given, k) for k in self._keys)

    def url_params(self, point_id: str) -> dict[str, str]:
        """Query parameters that let a URL of ``point_id``'s images in without a header (empty without keys)."""
        if not self._signing:
            return {}
        step = self.url_step_s
        expires = (int(self._clock() + self.url_ttl_s) // step + 1) * step
        return {"exp": str(expires), "sig": _sign(self._signing[0], point_id, expires)}

    def url_ok(self, point_id: str, exp: int | None, sig: str | None) -> bool:
        """True when ``exp``/``sig`` were issued for ``point_id`` by a current key and have not expired."""
        if not self._signing or exp is None or not sig:
            return False
        if exp < self._clock() or exp > self._clock() + self.url_ttl_s + self.url_step_s:
            return False
        return any(hmac.compare_digest(sig.encode(), _sign(k, point_id, exp).encode()) for k in self._signing)

    def allows_image(self, headers: Mapping[str, str], point_id: str, exp: int | None, sig: str | None) -> bool:
        """An image route: a key in the headers, or a signed URL for this point."""
        return self.key_ok(headers) or self.url_ok(point_id, exp, sig)


def check_key(request: Request, access: Access) -> None:
    """401 unless the request carries one of the service's API keys (or none is set)."""
    if not access.key_ok(request.headers):
        raise HTTPException(401, MISSING_KEY, headers={"WWW-Authenticate": "Bearer"})


def _sign(key: bytes, point_id: str, expires: int) -> str:
    mac = hmac.new(key, f"{point_id}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:24]).decode("ascii")
