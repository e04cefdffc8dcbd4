"""The JSON API, previews, downloads and the security cases, with aiohttp's test client."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from fake_service import FakeService
from pngdecode import decode_png, png_size
from stackwatch.engine.errors import StackwatchError
from stackwatch.web.app import CACHE_KEY, check_bind, composites, create_app

TOKEN = "s3cret-token"
Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture
def service() -> FakeService:
    svc = FakeService(seed=1)
    for _ in range(6):
        svc.add_frame()
    return svc


@pytest.fixture
async def client(aiohttp_client: MakeClient, service: FakeService) -> Client:
    return await aiohttp_client(create_app(service, token=TOKEN, preview_max_px=512))


async def test_status_lists_counts_and_stacks(client: Client) -> None:
    r = await client.get("/api/status")
    assert r.status == 200
    data = await r.json()
    assert data["frames"] == {"seen": 6, "stacked": 5, "rejected": 1, "failed": 0, "pending": 0}
    assert data["stacks"][0]["id"] == "s1" and data["stacks"][0]["ncombine"] == 5
    assert data["server"]["actions"] is True


async def test_frames_paging_filter_and_nan_as_null(client: Client) -> None:
    r = await client.get("/api/frames", params={"limit": "2", "offset": "1"})
    data = await r.json()
    assert data["total"] == 6 and [f["id"] for f in data["frames"]] == [2, 3]
    r = await client.get("/api/frames", params={"status": "rejected"})
    data = await r.json()
    assert data["total"] == 1
    rej = data["frames"][0]
    assert rej["reason"].startswith("few_stars") and rej["weight"] is None  # NaN -> null, valid JSON
    for bad in ({"limit": "0"}, {"limit": "100000"}, {"offset": "-1"}, {"limit": "1e3"},
                {"status": "../x"}, {"stack": "a/b"}, {"limit": "9" * 40}):
        r = await client.get("/api/frames", params=bad)
        assert r.status == 400, bad
        assert "error" in await r.json()


async def test_stacks_and_masters(client: Client) -> None:
    data = await (await client.get("/api/stacks")).json()
    assert [s["id"] for s in data["stacks"]] == ["s1"] and data["composites"] == []
    masters = (await (await client.get("/api/masters")).json())["masters"]
    assert {m["kind"] for m in masters} == {"bias", "dark", "flat"}


async def test_preview_is_cached_and_rerendered_once_per_update(client: Client, service: FakeService) -> None:
    cache = client.app[CACHE_KEY]
    r = await client.get("/api/stacks/s1/preview", params={"size": "256"})
    assert r.status == 200 and r.content_type == "image/png"
    body = await r.read()
    w, h, ctype = png_size(body)
    assert max(w, h) <= 256 and ctype == 0
    assert r.headers["X-Stack-Version"] == "5"
    assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
    renders = cache.renders
    for _ in range(5):
        again = await client.get("/api/stacks/s1/preview", params={"size": "256"})
        assert await again.read() == body
    assert cache.renders == renders  # never per request
    service.add_frame(rejected=False)  # stack_updated -> one pre-render of the variant in use
    for _ in range(100):
        if cache.renders == renders + 1:
            break
        await _sleep(0.02)
    assert cache.renders == renders + 1
    r = await client.get("/api/stacks/s1/preview", params={"size": "256"})
    assert r.headers["X-Stack-Version"] == "6" and await r.read() != body
    assert cache.renders == renders + 1


async def _sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


async def test_preview_parameters_validated(client: Client) -> None:
    for bad in ({"size": "abc"}, {"size": "10"}, {"stretch": "weird"}, {"strength": "nan"}, {"strength": "50"},
                {"layer": "../../etc/passwd"}, {"size": "1" * 30}):
        r = await client.get("/api/stacks/s1/preview", params=bad)
        assert r.status == 400, bad
    r = await client.get("/api/stacks/s1/preview", params={"size": "99999"})  # clamped to preview_max_px
    assert r.status == 200 and max(png_size(await r.read())[:2]) <= 512
    r = await client.get("/api/stacks/nope/preview")
    assert r.status == 404


async def test_histogram_and_maps(client: Client) -> None:
    r = await client.get("/api/stacks/s1/histogram", params={"size": "256"})
    data = await r.json()
    assert len(data["histogram"]) == 1 and len(data["histogram"][0]) == 256
    assert data["source_width"] == 320 and data["params"][0]["midtones"] > 0
    r = await client.get("/api/stacks/s1/preview", params={"layer": "rejection", "size": "512"})
    pix = decode_png(await r.read())
    assert pix.shape == (240, 320, 3) and pix[80, 100, 0] == 255  # the rejected trail row in red
    r = await client.get("/api/stacks/s1/preview", params={"layer": "coverage", "size": "512"})
    pix = decode_png(await r.read())
    assert pix[:, :3].max() == 0 and pix[:, 3:].min() == 255


async def test_crop_is_one_to_one_with_bounds(client: Client, service: FakeService) -> None:
    r = await client.get("/api/stacks/s1/crop", params={"x": "10", "y": "20", "w": "64", "h": "32"})
    assert r.status == 200
    pix = decode_png(await r.read())
    assert pix.shape == (32, 64)
    r = await client.get("/api/stacks/s1/crop", params={"x": "300", "y": "200", "w": "64", "h": "64"})
    assert decode_png(await r.read()).shape == (40, 20)  # clipped at the image edge
    for bad in ({"x": "0", "y": "0", "w": "5000", "h": "10"}, {"x": "400", "y": "0"}, {"y": "0"},
                {"x": "-5", "y": "0"}, {"x": "0", "y": "0", "w": "0"}):
        r = await client.get("/api/stacks/s1/crop", params=bad)
        assert r.status == 400, bad


async def test_fits_download_built_from_arrays(client: Client, service: FakeService) -> None:
    from astropy.io import fits

    r = await client.get("/api/stacks/s1/fits")
    assert r.status == 200 and "attachment" in r.headers["Content-Disposition"]
    with fits.open(io.BytesIO(await r.read())) as hdul:
        data = hdul[0].data
        assert data.dtype == np.dtype(">f4")
        np.testing.assert_array_equal(data, service.products["s1"]["image"])
        assert hdul[0].header["NCOMBINE"] == 5 and hdul[0].header["OBJECT"] == "M27"
        assert "NANVAL" not in hdul[0].header and "BAD KEY" not in hdul[0].header
    r = await client.get("/api/stacks/s1/fits", params={"product": "coverage"})
    with fits.open(io.BytesIO(await r.read())) as hdul:
        np.testing.assert_array_equal(hdul[0].data, service.products["s1"]["coverage"])
    r = await client.get("/api/stacks/s1/fits", params={"product": "/etc/passwd"})
    assert r.status == 400


async def test_colour_composite(aiohttp_client: MakeClient) -> None:
    svc = FakeService(seed=2, target="M42", filter="R", reject_every=0)
    g = svc.add_stack("M42", "Green")
    b = svc.add_stack("M42", "b")
    for sid in (svc.default_stack, g, b):
        svc.add_frame(stack_id=sid)
    found = composites(svc.list_stacks())
    assert [c["palette"] for c in found] == ["RGB"] and found[0]["members"] == ["s1", "s2", "s3"]
    client = await aiohttp_client(create_app(svc, token=TOKEN))
    r = await client.get(f"/api/composites/{found[0]['id']}/preview", params={"size": "256"})
    assert r.status == 200 and png_size(await r.read())[2] == 2  # RGB
    assert (await client.get("/api/composites/cnope/preview")).status == 404


def test_composite_palettes() -> None:
    st = [{"id": f"s{i}", "target": "NGC7000", "filter": f} for i, f in enumerate(["Ha 7nm", "OIII", "SII", "L"])]
    assert [c["palette"] for c in composites(st)] == ["SHO"]
    assert [c["palette"] for c in composites(st[:2])] == ["HOO"]
    assert composites([{"id": "a", "target": "X", "filter": "R"}, {"id": "b", "target": "Y", "filter": "G"},
                       {"id": "c", "target": "X", "filter": "B"}]) == []


# ---------------------------------------------------------------------------------------------
# Security


async def test_posts_need_the_token(client: Client, service: FakeService) -> None:
    url = "/api/frames/2/exclude"
    r = await client.post(url, json={"excluded": True})
    assert r.status == 403 and "token" in (await r.json())["error"]
    r = await client.post(url, json={"excluded": True}, headers={"X-Stackwatch-Token": "wrong"})
    assert r.status == 403
    r = await client.post(url, json={"excluded": True}, headers={"X-Stackwatch-Token": TOKEN * 100})
    assert r.status == 403
    assert service.actions == []
    r = await client.post(url, json={"excluded": True}, headers={"X-Stackwatch-Token": TOKEN})
    assert r.status == 200 and service.actions == [("exclude", (2, True))]
    r = await client.post(url, json={"excluded": False}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200 and service.actions[-1] == ("exclude", (2, False))


async def test_posts_are_csrf_safe(client: Client, service: FakeService) -> None:
    hdr = {"X-Stackwatch-Token": TOKEN}
    r = await client.post("/api/frames/2/exclude", data="excluded=true",
                          headers={**hdr, "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415
    r = await client.post("/api/frames/2/exclude", json={"excluded": True},
                          headers={**hdr, "Origin": "http://evil.example"})
    assert r.status == 403
    r = await client.post("/api/frames/2/exclude", json={"excluded": True},
                          headers={**hdr, "Sec-Fetch-Site": "cross-site"})
    assert r.status == 403
    origin = f"http://{client.server.host}:{client.server.port}"
    r = await client.post("/api/frames/2/exclude", json={"excluded": True}, headers={**hdr, "Origin": origin})
    assert r.status == 200
    assert (await client.get("/api/status", headers={"Origin": "http://evil.example"})).status == 200


async def test_actions_validate_and_map_errors(client: Client, service: FakeService) -> None:
    hdr = {"X-Stackwatch-Token": TOKEN}
    r = await client.post("/api/stacks/s1/reference", json={"frame_id": 1}, headers=hdr)
    assert r.status == 200 and service.stacks["s1"]["reference"] == 1
    r = await client.post("/api/stacks/s1/reference", json={"frame_id": 4}, headers=hdr)  # a rejected frame
    assert r.status == 400 and "rejected" in (await r.json())["error"]
    r = await client.post("/api/stacks/s9/reference", json={"frame_id": 1}, headers=hdr)
    assert r.status == 404
    r = await client.post("/api/stacks/s1/reference", json={"frame_id": "1; rm -rf /"}, headers=hdr)
    assert r.status == 400
    r = await client.post("/api/frames/999/exclude", json={"excluded": True}, headers=hdr)
    assert r.status == 404
    r = await client.post("/api/frames/2/exclude", json={"excluded": "yes"}, headers=hdr)
    assert r.status == 400
    r = await client.post("/api/stacks", json={"target": "M31", "filter": "Ha"}, headers=hdr)
    assert r.status == 200 and (await r.json())["id"] == "s2"
    r = await client.post("/api/stacks", json={"target": "x" * 500, "filter": "Ha"}, headers=hdr)
    assert r.status == 400
    r = await client.post("/api/stacks/s1/reintegrate", json={}, headers=hdr)
    assert r.status == 200 and service.actions[-1] == ("reintegrate", "s1")
    r = await client.post("/api/stacks/s1/reintegrate", data=b"[1,2", headers={**hdr, "Content-Type": "application/json"})
    assert r.status == 400
    r = await client.post("/api/stacks/s1/reintegrate", data=b"x" * 100_000,
                          headers={**hdr, "Content-Type": "application/json"})
    assert r.status in (400, 413)
    assert (await client.delete("/api/stacks/s1")).status in (404, 405)
    assert (await client.put("/api/stacks", json={})).status == 405


async def test_no_token_configured_disables_actions(aiohttp_client: MakeClient, service: FakeService) -> None:
    client = await aiohttp_client(create_app(service, token=""))
    r = await client.post("/api/stacks/s1/reintegrate", json={}, headers={"X-Stackwatch-Token": ""})
    assert r.status == 403 and "no token" in (await r.json())["error"]
    assert (await (await client.get("/api/status")).json())["server"]["actions"] is False


@pytest.mark.parametrize("path", [
    "/static/../pyproject.toml",
    "/static/%2e%2e/%2e%2e/pyproject.toml",
    "/static/..%2f..%2fpyproject.toml",
    "/static/%2e%2e%2fapp.py",
    "/api/stacks/..%2F..%2Fetc%2Fpasswd/fits",
    "/api/stacks/%2e%2e/preview",
    "/api/stacks/....//fits",
    "/../../etc/passwd",
    "/api/frames/..%2f1/exclude",
    "/static/vendor/../../app.py",
    "/static//etc/passwd",
])
async def test_path_traversal_never_reaches_files(client: Client, path: str) -> None:
    r = await client.get(path)
    assert r.status in (400, 403, 404, 405), (path, r.status)
    body = await r.read()
    assert b"root:" not in body and b"[build-system]" not in body and b"import" not in body
    assert r.headers.get("X-Content-Type-Options") == "nosniff"


async def test_oversized_requests(client: Client) -> None:
    r = await client.get("/api/frames?" + "a=" + "x" * 5000)
    assert r.status in (400, 414, 431)
    r = await client.get("/api/stacks/" + "a" * 129 + "/preview")
    assert r.status == 404
    r = await client.get("/api/stacks/M%2027%20L/preview")  # a readable id with spaces is fine, unknown here
    assert r.status == 404
    r = await client.get("/api/frames", params={"stack": "s" * 200})
    assert r.status == 400


async def test_security_headers_everywhere(client: Client) -> None:
    for path in ("/", "/api/status", "/static/app.js", "/api/nothing", "/static/vendor/uplot/uPlot.iife.min.js"):
        r = await client.get(path)
        h = r.headers
        assert "default-src 'self'" in h["Content-Security-Policy"], path
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["Referrer-Policy"] == "no-referrer"
        assert h["X-Frame-Options"] == "DENY"
    r = await client.get("/")
    assert r.status == 200 and b"stackwatch" in await r.read()


async def test_allowed_hosts_against_dns_rebinding(aiohttp_client: MakeClient, service: FakeService) -> None:
    client = await aiohttp_client(create_app(service, token=TOKEN, allowed_hosts=["127.0.0.1:8080"]))
    r = await client.get("/api/status", headers={"Host": "evil.example:8080"})
    assert r.status == 421
    r = await client.get("/api/status", headers={"Host": "127.0.0.1:8080"})
    assert r.status == 200


async def test_loopback_refuses_foreign_host_names(client: Client) -> None:
    port = client.server.port
    for host in (f"evil.example:{port}", "attacker.test", f"192.168.1.5:{port}"):
        r = await client.get("/api/status", headers={"Host": host})
        assert r.status == 421, host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        r = await client.get("/api/status", headers={"Host": host})
        assert r.status == 200, host


def test_check_bind() -> None:
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        check_bind(host, "")
    for host in ("0.0.0.0", "192.168.1.10", "::", "observatory.local"):
        with pytest.raises(StackwatchError, match=r"refusing to bind to .* without a token"):
            check_bind(host, "")
        check_bind(host, "tok")
    with pytest.raises(StackwatchError):
        check_bind("", "tok")


def test_create_app_validates() -> None:
    with pytest.raises(StackwatchError):
        create_app(FakeService(), token="", preview_max_px=10)
    assert isinstance(create_app(FakeService(), token="x"), web.Application)


def test_product_version_without_a_version_follows_the_image() -> None:
    from stackwatch.web.app import product_version

    img = np.zeros((100, 120), dtype=np.float32)
    assert product_version({"version": 7, "image": img}) == 7
    v0 = product_version({"image": img})
    assert v0 == product_version({"version": None, "image": img.copy()})
    img2 = img.copy()
    img2[::2, ::2] += 0.01  # the stack changed
    assert product_version({"image": img2}) != v0
