"""A small JSON-over-HTTP GET for the Jaeger and Prometheus sources.

Errors become one :class:`ReportError` naming the service and the URL; proxies
from the environment are honoured except for loopback addresses.

Usage::

    from otel_inference.report._http import get_json

    body = get_json("http://127.0.0.1:16686/api/traces", {"service": "embedder"}, what="Jaeger")
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from otel_inference.report._model import ReportError

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
DEFAULT_TIMEOUT = 30.0


def base_url(url: str, *, what: str) -> str:
    """``url`` checked (http or https, with a host), without a trailing slash."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ReportError(f"{what} URL {url!r} must look like http://host:port")
    return url.rstrip("/")


def get_json(
    url: str, params: Mapping[str, str], *, what: str, timeout: float = DEFAULT_TIMEOUT
) -> Any:
    """GET ``url?params`` and decode its JSON body; :class:`ReportError` on any failure."""
    full = f"{url}?{urllib.parse.urlencode(params)}" if params else url
    host = urllib.parse.urlsplit(url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(full, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = _error_detail(exc)
        raise ReportError(
            f"{what} at {url} answered HTTP {exc.code} {exc.reason}{detail}"
        ) from None
    except urllib.error.URLError as exc:
        raise ReportError(f"cannot reach {what} at {url}: {exc.reason}") from None
    except TimeoutError:
        raise ReportError(f"{what} at {url} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ReportError(f"cannot reach {what} at {url}: {exc}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise ReportError(f"{what} at {url} did not answer with JSON") from None


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
    except Exception:
        return ""
    if isinstance(body, Mapping):
        message = body.get("error") or body.get("errors")
        if message:
            return f": {str(message)[:300]}"
    return ""
