"""API key check: `Authorization: Bearer KEY`, compared in constant time (hmac.compare_digest
on bytes), so response timing tells nothing about how much of a guess was right."""

from __future__ import annotations

import hmac
import os

from gptdeploy.errors import GptDeployError
from gptdeploy.serve.errors import ApiError

ENV_KEY = "GPTDEPLOY_API_KEY"


def api_key_from(option: str | None) -> str | None:
    """--api-key, else the GPTDEPLOY_API_KEY environment variable; None: no key required."""
    key = option if option is not None else os.environ.get(ENV_KEY)
    if key is not None and (not key or any(c.isspace() for c in key)):
        raise GptDeployError(f"the API key (--api-key or {ENV_KEY}) must be non-empty and have no spaces")
    return key or None


def check(expected: str | None, authorization: str | None) -> None:
    """Raises a 401 unless the header carries the expected key; no key set: everything passes."""
    if expected is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    # Compare even when the scheme is wrong, so both failures take the same time.
    ok = hmac.compare_digest(given.strip().encode(), expected.encode())
    if scheme.lower() != "bearer" or not ok:
        raise ApiError(
            401,
            "missing or invalid API key; send `Authorization: Bearer <key>`",
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
