"""The web view's aiohttp application: JSON API, previews, downloads, WebSocket events, the page.

`create_app(service, token=...)` builds the application around anything that implements
`ServiceView` (the running service, or a fake in tests). `check_bind(host, token)` refuses to
expose the view beyond loopback without a token.

Security model
--------------
- Reads (GET) are open: the view binds to 127.0.0.1 by default.
- Every state change is a POST with a JSON body and the token (header ``X-Stackwatch-Token`` or
  ``Authorization: Bearer``), compared in constant time. No cookies are used, and a cross-site page
  can send neither the custom header nor a JSON content type without a CORS preflight, which this
  server never grants: CSRF-safe. A foreign ``Origin`` on a POST or WebSocket is refused.
- DNS rebinding: on a loopback socket, a Host header naming anything but 127.x, ::1 or localhost
  is refused (421); ``allowed_hosts`` replaces that rule with an explicit list.
- No request path or parameter reaches the filesystem: stacks, products and masters are served by
  validated id from the service's memory; the only files served are the page's own, from one fixed
  folder through aiohttp's static route (which refuses traversal and symlinks).
- Parameters are validated with size limits (400 when out of range); security headers on every
  response (CSP default-src 'self', nosniff, no-referrer, frame-ancestors none / DENY).

Previews are rendered in one worker thread (never more than one core), cached by
(stack id, stack version, layer, size, stretch, strength), re-rendered once per stack update for the
variants clients asked for recently, never per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import math
import re
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from aiohttp import web
from stackwatch.engine.errors import StackwatchError

from . import preview as pv
from .events import EventHub, json_dumps

__all__ = [
    "CACHE_KEY",
    "HUB_KEY",
    "SERVICE_KEY",
    "STATIC_DIR",
    "PreviewCache",
    "ServiceView",
    "check_bind",
    "composites",
    "create_app",
    "is_loopback",
    "product_version",
]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_log = logging.getLogger("stackwatch.web")

# Ids only ever select an entry of the service's memory; the pattern bounds their size and keeps out
# separators and control characters (anything else, e.g. a target name with spaces, is allowed).
_ID_RE = re.compile(r"^[^\x00-\x1f\x7f/\\<>\"'`%]{1,128}$")
_STATUS_RE = re.compile(r"^[a-z_]{1,24}$")
_MAX_QUERY_CHARS = 1024
_MAX_BODY_BYTES = 16 * 1024
_CROP_MAX = 1024
_LAYERS = ("image", "rejection", "rej_low", "rej_high", "coverage")
_PRODUCTS = ("image", "rej_low", "rej_high", "coverage")
_PREVIEW_SIZES = (256, 512, 1024, 2048, 4096)


class ServiceView(Protocol):
    """What the web view needs from the service (implemented by stackwatch.daemon.service.Service)."""

    def status(self) -> dict[str, Any]: ...

    def list_frames(
        self, *, stack_id: str | None = None, status: str | None = None, offset: int = 0, limit: int = 100
    ) -> dict[str, Any]: ...

    def list_stacks(self) -> list[dict[str, Any]]: ...

    def stack_products(self, stack_id: str) -> dict[str, Any] | None: ...

    def list_masters(self) -> list[dict[str, Any]]: ...

    def add_listener(self, callback: Callable[[dict[str, Any]], None]) -> None: ...

    def remove_listener(self, callback: Callable[[dict[str, Any]], None]) -> None: ...

    async def exclude_frame(self, frame_id: int, excluded: bool) -> dict[str, Any]: ...

    async def set_reference(self, stack_id: str, frame_id: int) -> dict[str, Any]: ...

    async def new_stack(self, target: str, filter: str) -> dict[str, Any]: ...

    async def reintegrate(self, stack_id: str) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------------------------
# Binding


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str) -> None:
    """Refuse to serve on a non-loopback address without a token (StackwatchError with the reason)."""
    if not host or not host.strip():
        raise StackwatchError("web view: empty bind address; use 127.0.0.1 (default) or a host with a token")
    if not is_loopback(host) and not token:
        raise StackwatchError(
            f"web view: refusing to bind to {host} without a token: anyone on the network could change the "
            "stack. Set [service] token in the configuration, or bind to 127.0.0.1 (the default)"
        )


# ----------------------------------------------------------------------------------------------
# Previews


_RenderKey = tuple[str, int, str, int, bool, float]


def product_version(products: Mapping[str, Any]) -> int:
    """The stack version the service reports; without one, a fingerprint of the image (CRC of a
    strided sample, shape and dtype) so that a changed stack is never served from a stale preview."""
    v = products.get("version")
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return int(v)
    image = products.get("image")
    if image is None:
        return 0
    a = np.asarray(image)
    sample = np.ascontiguousarray(a[..., :: max(1, a.shape[-2] // 64), :: max(1, a.shape[-1] // 64)])
    return zlib.crc32(sample.tobytes(), zlib.crc32(repr((a.shape, a.dtype.str)).encode())) + (1 << 40)


class PreviewCache:
    """Rendered previews by (stack id, version, layer, size, linked, strength); renders in one thread.

    Concurrent requests for the same key share one render. Older versions of a stack are dropped
    when a newer one is rendered; at most `max_entries` previews are kept (least recently used out).
    """

    def __init__(self, executor: ThreadPoolExecutor, *, max_entries: int = 48) -> None:
        self._executor = executor
        self._entries: OrderedDict[_RenderKey, asyncio.Future[pv.Preview]] = OrderedDict()
        self._recent: dict[str, OrderedDict[tuple[str, int, bool, float], None]] = {}
        self.max_entries = max_entries
        self.renders = 0

    def recent_variants(self, stack_id: str) -> list[tuple[str, int, bool, float]]:
        return list(self._recent.get(stack_id, {}))

    async def get(self, stack_id: str, products: Mapping[str, Any], layer: str, size: int, linked: bool,
                  strength: float) -> pv.Preview:
        version = product_version(products)
        key: _RenderKey = (stack_id, version, layer, size, linked, strength)
        variants = self._recent.setdefault(stack_id, OrderedDict())
        variants[(layer, size, linked, strength)] = None
        variants.move_to_end((layer, size, linked, strength))
        while len(variants) > 4:
            variants.popitem(last=False)
        fut = self._entries.get(key)
        if fut is not None:
            self._entries.move_to_end(key)
            return await asyncio.shield(fut)
        loop = asyncio.get_running_loop()
        render = _renderer(products, layer, size, linked, strength)
        fut = loop.run_in_executor(self._executor, render)
        self._entries[key] = fut
        self.renders += 1
        try:
            result = await asyncio.shield(fut)
        except BaseException:
            if self._entries.get(key) is fut and fut.done():
                del self._entries[key]
            raise
        for old in [k for k in self._entries if k[0] == stack_id and k[1] < version and k[2:] == key[2:]]:
            del self._entries[old]
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return result


def _renderer(products: Mapping[str, Any], layer: str, size: int, linked: bool,
              strength: float) -> Callable[[], pv.Preview]:
    def render() -> pv.Preview:
        if layer == "image":
            return pv.render_preview(np.asarray(products["image"]), max_px=size, linked=linked, strength=strength)
        if layer == "rejection":
            low, high = products.get("rej_low"), products.get("rej_high")
            if low is None or high is None:
                raise KeyError(layer)
            return pv.render_map([np.asarray(low), np.asarray(high)], max_px=size)
        arr = products.get(layer)
        if arr is None:
            raise KeyError(layer)
        return pv.render_map([np.asarray(arr)], max_px=size)

    return render


# ----------------------------------------------------------------------------------------------
# Colour composites


_FILTER_ALIASES = {
    "R": "R", "RED": "R", "G": "G", "GREEN": "G", "B": "B", "BLUE": "B",
    "HA": "HA", "H": "HA", "HALPHA": "HA", "H-ALPHA": "HA", "HA7NM": "HA", "HYDROGEN": "HA",
    "OIII": "OIII", "O3": "OIII", "O-III": "OIII", "OXYGEN": "OIII",
    "SII": "SII", "S2": "SII", "S-II": "SII", "SULFUR": "SII", "SULPHUR": "SII",
}
_PALETTES = (("RGB", ("R", "G", "B")), ("SHO", ("SII", "HA", "OIII")), ("HOO", ("HA", "OIII", "OIII")))


def _canonical_filter(name: str) -> str:
    key = re.sub(r"[\s_]+", "", str(name)).upper()
    key = re.sub(r"\d+(\.\d+)?NM$", "", key) or key
    return _FILTER_ALIASES.get(key, key)


def composites(stacks: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Colour composites possible from a list of stacks: per target, RGB from R, G, B stacks; SHO from
    SII, Ha, OIII (Hubble palette); HOO from Ha and OIII when SII is missing. Each has a stable id."""
    by_target: dict[str, dict[str, Mapping[str, Any]]] = {}
    for s in stacks:
        by_target.setdefault(str(s.get("target", "")), {}).setdefault(_canonical_filter(str(s.get("filter", ""))), s)
    out = []
    for target, filters in sorted(by_target.items()):
        for palette, needed in _PALETTES:
            if palette == "HOO" and "SII" in filters:
                continue
            if all(f in filters for f in needed):
                members = [str(filters[f]["id"]) for f in needed]
                cid = "c" + hashlib.sha1(f"{target}\x00{palette}".encode()).hexdigest()[:12]
                out.append({"id": cid, "target": target, "palette": palette, "members": members,
                            "channels": list(needed)})
    return out


# ----------------------------------------------------------------------------------------------
# Application keys and helpers


class _Settings:
    def __init__(self, token: str, preview_max_px: int, allowed_hosts: frozenset[str] | None) -> None:
        self.token = token
        self.preview_max_px = preview_max_px
        self.allowed_hosts = allowed_hosts
        self.started_at = time.time()


SERVICE_KEY = web.AppKey("service", ServiceView)
HUB_KEY = web.AppKey("hub", EventHub)
CACHE_KEY = web.AppKey("preview_cache", PreviewCache)
_SETTINGS_KEY = web.AppKey("settings", _Settings)
_PRERENDER_KEY = web.AppKey("prerender", asyncio.Queue)


class _BadRequest(StackwatchError):
    pass


def _json(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(text=json_dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


def _id(request: web.Request, name: str = "id") -> str:
    value = request.match_info.get(name, "")
    if not _ID_RE.match(value):
        raise web.HTTPNotFound(text=json_dumps({"error": "unknown id"}), content_type="application/json")
    return value


def _int_param(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        if default is None:
            raise _BadRequest(f"parameter {name} is required")
        return default
    if len(raw) > 12 or not re.fullmatch(r"-?\d+", raw):
        raise _BadRequest(f"parameter {name} must be a whole number")
    value = int(raw)
    if not lo <= value <= hi:
        raise _BadRequest(f"parameter {name}={value} is outside {lo}..{hi}")
    return value


def _choice_param(request: web.Request, name: str, default: str, choices: Sequence[str]) -> str:
    raw = request.query.get(name, default)
    if raw not in choices:
        raise _BadRequest(f"parameter {name} must be one of {', '.join(choices)}")
    return raw


def _strength_param(request: web.Request) -> float:
    raw = request.query.get("strength", "1")
    try:
        if len(raw) > 12:
            raise ValueError(raw)
        value = float(raw)
    except ValueError:
        raise _BadRequest("parameter strength must be a number") from None
    if not (math.isfinite(value) and 0.1 <= value <= 10.0):
        raise _BadRequest("parameter strength is outside 0.1..10")
    return round(value * 20.0) / 20.0  # 0.05 steps: bounded number of cache variants


def _preview_size(request: web.Request, max_px: int) -> int:
    want = _int_param(request, "size", min(1024, max_px), 16, 100_000)
    sizes = [s for s in _PREVIEW_SIZES if s < max_px] + [max_px]
    return next((s for s in sizes if s >= want), max_px)


# ----------------------------------------------------------------------------------------------
# Middlewares and signals

_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    h = response.headers
    h.setdefault("Content-Security-Policy", _CSP)
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "no-referrer")
    h.setdefault("X-Frame-Options", "DENY")
    h.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    h.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if request.path.startswith("/api/"):
        h.setdefault("Cache-Control", "no-store")
    elif "Cache-Control" not in h:
        h["Cache-Control"] = "no-cache"


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")
    return origin == f"{request.scheme}://{request.host}"


def _host_name(host: str) -> str:
    """The name part of a Host header ('[::1]:8080' -> '::1', 'localhost:8080' -> 'localhost')."""
    h = host.strip()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h[1:]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _loopback_socket(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return bool(sock) and isinstance(sock, tuple) and is_loopback(str(sock[0]))


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    settings = request.app[_SETTINGS_KEY]
    if len(request.query_string) > _MAX_QUERY_CHARS or len(request.raw_path) > 2048:
        return _error(400, "request too long")
    if settings.allowed_hosts is not None:
        if request.host.lower() not in settings.allowed_hosts:
            return _error(421, "unknown host")
    elif _loopback_socket(request) and not is_loopback(_host_name(request.host)):
        # Served on loopback but addressed by another name: a DNS-rebinding page, not the user.
        return _error(421, "this view answers only to 127.0.0.1, ::1 or localhost")
    if request.method not in ("GET", "HEAD", "POST"):
        return _error(405, "method not allowed")
    is_ws = request.path == "/ws"
    if (request.method == "POST" or is_ws) and not _same_origin(request):
        return _error(403, "cross-origin request refused")
    try:
        result: web.StreamResponse = await handler(request)
        return result
    except _BadRequest as exc:
        return _error(400, str(exc))
    except StackwatchError as exc:
        return _error(400, str(exc))


def _token_ok(request: web.Request) -> tuple[bool, str]:
    expected = request.app[_SETTINGS_KEY].token
    if not expected:
        return False, "state changes are disabled: no token is configured"
    given = request.headers.get("X-Stackwatch-Token", "")
    if not given:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
    if not given:
        return False, "this action needs the token (X-Stackwatch-Token header)"
    if len(given) > 512 or not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
        return False, "wrong token"
    return True, ""


async def _json_body(request: web.Request) -> dict[str, Any]:
    ok, why = _token_ok(request)
    if not ok:
        raise web.HTTPForbidden(text=json_dumps({"error": why}), content_type="application/json")
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=json_dumps({"error": "send a JSON body (Content-Type: application/json)"}),
            content_type="application/json",
        )
    if request.content_length is not None and request.content_length > _MAX_BODY_BYTES:
        raise _BadRequest("request body too large")
    raw = await request.content.read(_MAX_BODY_BYTES + 1)
    if len(raw) > _MAX_BODY_BYTES:
        raise _BadRequest("request body too large")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


async def _call_service(coro: Any) -> web.Response:
    try:
        result = await coro
    except KeyError as exc:
        return _error(404, f"unknown id {exc.args[0] if exc.args else ''}".strip())
    except ValueError as exc:
        return _error(400, str(exc) or "invalid request")
    return _json(result)


# ----------------------------------------------------------------------------------------------
# Handlers


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _status(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    data = dict(service.status())
    data["server"] = {
        "clients": len(request.app[HUB_KEY].clients),
        "started_at": request.app[_SETTINGS_KEY].started_at,
        "actions": bool(request.app[_SETTINGS_KEY].token),
    }
    data["composites"] = composites(data.get("stacks") or service.list_stacks())
    return _json(data)


async def _frames(request: web.Request) -> web.Response:
    stack = request.query.get("stack") or None
    if stack is not None and not _ID_RE.match(stack):
        raise _BadRequest("parameter stack is not a valid stack id")
    status = request.query.get("status") or None
    if status is not None and not _STATUS_RE.match(status):
        raise _BadRequest("parameter status is not a valid status")
    offset = _int_param(request, "offset", 0, 0, 10_000_000)
    limit = _int_param(request, "limit", 100, 1, 1000)
    return _json(request.app[SERVICE_KEY].list_frames(stack_id=stack, status=status, offset=offset, limit=limit))


async def _stacks(request: web.Request) -> web.Response:
    stacks = request.app[SERVICE_KEY].list_stacks()
    return _json({"stacks": stacks, "composites": composites(stacks)})


async def _masters(request: web.Request) -> web.Response:
    return _json({"masters": request.app[SERVICE_KEY].list_masters()})


def _products(request: web.Request, stack_id: str) -> Mapping[str, Any]:
    products = request.app[SERVICE_KEY].stack_products(stack_id)
    if products is None or products.get("image") is None:
        raise web.HTTPNotFound(text=json_dumps({"error": f"no stack {stack_id}"}), content_type="application/json")
    return products


def _composite_products(request: web.Request, cid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    service = request.app[SERVICE_KEY]
    found = next((c for c in composites(service.list_stacks()) if c["id"] == cid), None)
    if found is None:
        raise web.HTTPNotFound(text=json_dumps({"error": f"no composite {cid}"}), content_type="application/json")
    planes, versions = [], []
    for sid in found["members"]:
        p = service.stack_products(sid)
        if p is None or p.get("image") is None:
            raise web.HTTPNotFound(text=json_dumps({"error": f"stack {sid} has no image yet"}),
                                   content_type="application/json")
        planes.append(np.asarray(p["image"]))
        versions.append(product_version(p))
    try:
        image = pv.composite(*planes)
    except StackwatchError as exc:
        raise web.HTTPConflict(text=json_dumps({"error": str(exc)}), content_type="application/json") from None
    # One number that changes whenever a member changes (members only ever grow their versions).
    version = sum(versions) * 1_000_003 + hash(tuple(versions)) % 1_000_003
    return {"version": version, "image": image}, found


async def _render(request: web.Request, key_id: str, products: Mapping[str, Any]) -> web.Response:
    layer = _choice_param(request, "layer", "image", _LAYERS)
    size = _preview_size(request, request.app[_SETTINGS_KEY].preview_max_px)
    linked = _choice_param(request, "stretch", "linked", ("linked", "unlinked")) == "linked"
    strength = _strength_param(request)
    try:
        prev = await request.app[CACHE_KEY].get(key_id, products, layer, size, linked, strength)
    except KeyError:
        return _error(404, f"stack {key_id} has no {layer} map")
    if request.path.endswith("/histogram"):
        return _json({
            "version": product_version(products),
            "width": prev.width, "height": prev.height, "factor": prev.factor,
            "source_width": prev.source_shape[1], "source_height": prev.source_shape[0],
            "params": [{"shadows": p.shadows, "midtones": p.midtones, "highlights": p.highlights} for p in prev.params],
            "histogram": prev.histogram.tolist(),
        })
    return web.Response(
        body=prev.png,
        content_type="image/png",
        headers={
            "X-Stack-Version": str(product_version(products)),
            "X-Preview-Factor": str(prev.factor),
            "X-Source-Size": f"{prev.source_shape[1]}x{prev.source_shape[0]}",
        },
    )


async def _preview(request: web.Request) -> web.Response:
    stack_id = _id(request)
    return await _render(request, stack_id, _products(request, stack_id))


async def _composite_preview(request: web.Request) -> web.Response:
    cid = _id(request)
    products, _ = _composite_products(request, cid)
    return await _render(request, cid, products)


async def _crop(request: web.Request) -> web.Response:
    stack_id = _id(request)
    products = _products(request, stack_id)
    image = np.asarray(products["image"])
    shape = (int(image.shape[-2]), int(image.shape[-1]))
    x = _int_param(request, "x", None, 0, 1_000_000)
    y = _int_param(request, "y", None, 0, 1_000_000)
    w = _int_param(request, "w", 256, 1, _CROP_MAX)
    h = _int_param(request, "h", 256, 1, _CROP_MAX)
    region = pv.crop_region(shape, x, y, w, h, max_side=_CROP_MAX)
    linked = _choice_param(request, "stretch", "linked", ("linked", "unlinked")) == "linked"
    strength = _strength_param(request)
    # The crop uses the stretch of the preview (computed at full resolution), so both look alike.
    cache = request.app[CACHE_KEY]
    prev = await cache.get(stack_id, products, "image", min(1024, request.app[_SETTINGS_KEY].preview_max_px),
                           linked, strength)
    loop = asyncio.get_running_loop()
    png = await loop.run_in_executor(cache._executor, pv.render_crop, image, region, prev.params)
    return web.Response(body=png, content_type="image/png",
                        headers={"X-Crop-Region": ",".join(str(v) for v in region)})


def _fits_header_cards(header: Mapping[str, Any]) -> list[tuple[str, Any]]:
    cards: list[tuple[str, Any]] = []
    for key, value in header.items():
        k = str(key).upper()
        if not re.fullmatch(r"[A-Z0-9_-]{1,8}", k) or k in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2",
                                                             "NAXIS3", "EXTEND", "XTENSION", "END", "BZERO",
                                                             "BSCALE", "PCOUNT", "GCOUNT"):
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
            cards.append((k, value))
        elif isinstance(value, str):
            cards.append((k, "".join(ch for ch in value if 32 <= ord(ch) < 127)[:68]))
    return cards


def _fits_bytes(array: np.ndarray, header: Mapping[str, Any], product: str, stack_id: str) -> bytes:
    from astropy.io import fits

    data = np.asarray(array)
    data = data.astype(np.float32, copy=False) if product == "image" else data.astype(np.uint16, copy=False)
    hdu = fits.PrimaryHDU(data=data)
    for k, v in _fits_header_cards(header):
        with contextlib.suppress(ValueError, KeyError):
            hdu.header[k] = v
    hdu.header["SWPROD"] = (product, "stackwatch product")
    hdu.header["SWSTACK"] = (stack_id, "stackwatch stack id")
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


async def _fits(request: web.Request) -> web.Response:
    stack_id = _id(request)
    products = _products(request, stack_id)
    product = _choice_param(request, "product", "image", _PRODUCTS)
    array = products.get(product)
    if array is None:
        return _error(404, f"stack {stack_id} has no {product} product")
    header = products.get("header") or {}
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(request.app[CACHE_KEY]._executor, _fits_bytes, array, header, product, stack_id)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stack_id}_{product}")[:80] + ".fits"
    return web.Response(body=body, content_type="application/fits",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})


async def _ws(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    settings = request.app[_SETTINGS_KEY]
    return await hub.handle(request, {"started_at": settings.started_at})


# POST actions -----------------------------------------------------------------------------------


def _body_int(body: Mapping[str, Any], name: str) -> int:
    v = body.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**53:
        raise _BadRequest(f"field {name} must be a non-negative whole number")
    return v


def _body_str(body: Mapping[str, Any], name: str, *, max_len: int = 80) -> str:
    v = body.get(name)
    if not isinstance(v, str) or len(v) > max_len or any(ord(c) < 32 for c in v):
        raise _BadRequest(f"field {name} must be a string of at most {max_len} printable characters")
    return v


def _frame_id(request: web.Request) -> int:
    raw = request.match_info.get("frame_id", "")
    if not re.fullmatch(r"\d{1,15}", raw):
        raise web.HTTPNotFound(text=json_dumps({"error": "unknown frame id"}), content_type="application/json")
    return int(raw)


async def _post_exclude(request: web.Request) -> web.Response:
    frame_id = _frame_id(request)
    body = await _json_body(request)
    excluded = body.get("excluded", True)
    if not isinstance(excluded, bool):
        raise _BadRequest("field excluded must be true or false")
    return await _call_service(request.app[SERVICE_KEY].exclude_frame(frame_id, excluded))


async def _post_reference(request: web.Request) -> web.Response:
    stack_id = _id(request)
    body = await _json_body(request)
    return await _call_service(request.app[SERVICE_KEY].set_reference(stack_id, _body_int(body, "frame_id")))


async def _post_new_stack(request: web.Request) -> web.Response:
    body = await _json_body(request)
    return await _call_service(
        request.app[SERVICE_KEY].new_stack(_body_str(body, "target"), _body_str(body, "filter", max_len=32))
    )


async def _post_reintegrate(request: web.Request) -> web.Response:
    stack_id = _id(request)
    await _json_body(request)
    return await _call_service(request.app[SERVICE_KEY].reintegrate(stack_id))


# ----------------------------------------------------------------------------------------------
# The factory


def create_app(
    service: ServiceView,
    *,
    token: str,
    preview_max_px: int = 2048,
    allowed_hosts: Sequence[str] | None = None,
    ws_queue_size: int = 256,
    ws_heartbeat_s: float = 20.0,
) -> web.Application:
    """The web view application around `service`.

    Parameters
    ----------
    service : anything implementing ServiceView.
    token : required by every POST; empty disables state changes. Compared in constant time.
    preview_max_px : longest side of a preview. Default is 2048.
    allowed_hosts : accepted Host headers (e.g. ``["observatory.local:8080"]``); None accepts, on a
        loopback socket, only loopback names (DNS-rebinding protection), and any name otherwise.
        Default is None.
    ws_queue_size : messages buffered per WebSocket client before dropping the oldest. Default is 256.
    ws_heartbeat_s : WebSocket ping interval; a peer that stops answering is closed. Default is 20.
    """
    if not 64 <= preview_max_px <= 8192:
        raise StackwatchError(f"preview_max_px must be within 64..8192, got {preview_max_px}")
    app = web.Application(middlewares=[_guard], client_max_size=_MAX_BODY_BYTES)
    app[SERVICE_KEY] = service
    app[HUB_KEY] = EventHub(queue_size=ws_queue_size, heartbeat_s=ws_heartbeat_s)
    app[_SETTINGS_KEY] = _Settings(
        token, preview_max_px, frozenset(h.lower() for h in allowed_hosts) if allowed_hosts is not None else None
    )
    app[_PRERENDER_KEY] = asyncio.Queue()
    app.on_response_prepare.append(_security_headers)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_on_shutdown)

    r = app.router
    r.add_get("/", _index)
    r.add_get("/api/status", _status)
    r.add_get("/api/frames", _frames)
    r.add_get("/api/stacks", _stacks)
    r.add_get("/api/masters", _masters)
    r.add_get("/api/stacks/{id}/preview", _preview)
    r.add_get("/api/stacks/{id}/histogram", _preview)
    r.add_get("/api/stacks/{id}/crop", _crop)
    r.add_get("/api/stacks/{id}/fits", _fits)
    r.add_get("/api/composites/{id}/preview", _composite_preview)
    r.add_get("/api/composites/{id}/histogram", _composite_preview)
    r.add_post("/api/frames/{frame_id}/exclude", _post_exclude)
    r.add_post("/api/stacks/{id}/reference", _post_reference)
    r.add_post("/api/stacks/{id}/reintegrate", _post_reintegrate)
    r.add_post("/api/stacks", _post_new_stack)
    r.add_get("/ws", _ws)
    r.add_static("/static/", STATIC_DIR, follow_symlinks=False, show_index=False)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackwatch-preview")
    app[CACHE_KEY] = PreviewCache(executor)
    hub = app[HUB_KEY]
    service = app[SERVICE_KEY]
    queue: asyncio.Queue[str] = app[_PRERENDER_KEY]

    def on_event(event: dict[str, Any]) -> None:
        hub.publish(event)
        if event.get("type") == "stack_updated":
            sid = (event.get("data") or {}).get("id")
            if isinstance(sid, str) and _ID_RE.match(sid) and queue.qsize() < 64:
                queue.put_nowait(sid)

    async def prerender() -> None:
        cache = app[CACHE_KEY]
        while True:
            sid = await queue.get()
            pending = {sid}
            while not queue.empty():
                pending.add(queue.get_nowait())
            for stack_id in pending:
                variants = cache.recent_variants(stack_id)
                if not variants:
                    continue
                products = service.stack_products(stack_id)
                if products is None or products.get("image") is None:
                    continue
                for layer, size, linked, strength in variants:
                    try:
                        await cache.get(stack_id, products, layer, size, linked, strength)
                    except (KeyError, StackwatchError):
                        pass  # that layer does not exist (yet) for this stack
                    except Exception:  # a bug, but the pre-renderer must outlive it: log and go on
                        _log.exception("pre-rendering the preview of stack %s failed", stack_id)

    service.add_listener(on_event)
    task = asyncio.create_task(prerender())
    try:
        yield
    finally:
        service.remove_listener(on_event)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        executor.shutdown(wait=True, cancel_futures=True)


async def _on_shutdown(app: web.Application) -> None:
    await app[HUB_KEY].close_all()
