"""Image loading for `image_url` parts (tokenmill.multimodal.media): decoding each format,
data: URLs, decompression bombs, and http(s) fetching against a real local server (domain
allow-list, the private-address check, pinning, redirects, size and time limits)."""

from __future__ import annotations

import base64
import io
import random
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.local_http import serving
from tokenmill.errors import InvalidRequestError
from tokenmill.multimodal import media
from tokenmill.multimodal.media import (
    MediaPolicy,
    decode_image,
    is_public_address,
    load_data_url,
    load_image_url,
)

PARAM = "messages[0].content[1].image_url"


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png(width: int = 7, height: int = 5, color: tuple[int, ...] = (10, 200, 30)) -> bytes:
    return _encode(Image.new("RGB", (width, height), color), "PNG")


def _noise(width: int, height: int) -> Image.Image:
    """An RGB image that does not compress much (so a truncated file lacks pixel data)."""
    return Image.frombytes("RGB", (width, height), random.Random(0).randbytes(width * height * 3))


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR says width x height: tiny on disk, huge if decoded."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8  # after the signature: length (4), type (4), then width, height, ...
    assert data[ihdr + 4 : ihdr + 8] == b"IHDR"
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 8 + 13 : ihdr + 8 + 17] = struct.pack(">I", crc)
    return bytes(data)


def _refused(call: Callable[[], object], *words: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        call()
    _check(info.value, *words)
    return info.value


async def _refused_async(url: str, policy: MediaPolicy, *words: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        await load_image_url(url, policy, PARAM)
    _check(info.value, *words)
    return info.value


def _check(error: InvalidRequestError, *words: str) -> None:
    assert error.param == PARAM
    assert error.status_code == 400
    for word in words:
        assert word.lower() in error.message.lower(), error.message


# --- decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, kwargs",
    [("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {"lossless": True}), ("GIF", {})],
)
def test_each_format_decodes_to_rgb_of_its_size(fmt: str, kwargs: dict[str, Any]) -> None:
    data = _encode(Image.new("RGB", (13, 9), (200, 40, 40)), fmt, **kwargs)
    image = decode_image(data, MediaPolicy(), PARAM)
    assert image.mode == "RGB" and image.size == (13, 9)
    red, green, blue = image.getpixel((6, 4))  # type: ignore[misc]
    assert red > 150 and green < 90 and blue < 90


def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(io.BytesIO(buf.getvalue())) as gif:
        assert getattr(gif, "n_frames", 1) == 2
    image = decode_image(buf.getvalue(), MediaPolicy(), PARAM)
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 0, 0)


def test_rgba_becomes_rgb_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent
    rgba.putpixel((0, 0), (0, 128, 0, 255))  # one opaque pixel
    image = decode_image(_encode(rgba, "PNG"), MediaPolicy(), PARAM)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 128, 0)
    assert image.getpixel((3, 3)) == (255, 255, 255)


def test_grayscale_becomes_rgb() -> None:
    image = decode_image(_encode(Image.new("L", (3, 2), 77), "PNG"), MediaPolicy(), PARAM)
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (77, 77, 77)


def test_corrupt_unknown_and_truncated_images_are_refused() -> None:
    policy = MediaPolicy()
    _refused(lambda: decode_image(b"definitely not an image", policy, PARAM), "png")
    _refused(lambda: decode_image(b"", policy, PARAM))
    bmp = _encode(Image.new("RGB", (2, 2)), "BMP")  # a real image, not an allowed format
    _refused(lambda: decode_image(bmp, policy, PARAM), "png, jpeg")
    noisy = _noise(64, 64)
    png = _encode(noisy, "PNG")
    _refused(lambda: decode_image(png[: len(png) // 2], policy, PARAM), "decoded")
    jpeg = _encode(noisy, "JPEG")
    _refused(lambda: decode_image(jpeg[: len(jpeg) // 2], policy, PARAM), "decoded")


def test_too_many_bytes_is_refused() -> None:
    data = _png(64, 64)
    _refused(lambda: decode_image(data, MediaPolicy(max_bytes=len(data) - 1), PARAM), "bytes")
    assert decode_image(data, MediaPolicy(max_bytes=len(data)), PARAM).size == (64, 64)


def test_pixel_limit_is_checked_from_the_header() -> None:
    # 8000x8000 is under Pillow's own guard, so this is the policy's check, before decoding.
    bomb = _png_claiming_size(8000, 8000)
    assert len(bomb) < 100
    error = _refused(lambda: decode_image(bomb, MediaPolicy(), PARAM), "pixels")
    assert "8000x8000 = 64000000 pixels; the limit is 40000000" in error.message
    small = _png(20, 10)
    _refused(lambda: decode_image(small, MediaPolicy(max_pixels=199), PARAM), "20x10 = 200")
    assert decode_image(small, MediaPolicy(max_pixels=200), PARAM).size == (20, 10)


def test_decompression_bomb_past_pillows_own_guard_is_a_400() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    bomb = _png_claiming_size(20000, 20000)  # 400M pixels: Pillow raises on open
    _refused(lambda: decode_image(bomb, MediaPolicy(), PARAM), "pixels")
    # Even when the operator allows more than Pillow does, Pillow's error is a 400.
    _refused(lambda: decode_image(bomb, MediaPolicy(max_pixels=10**12), PARAM), "pixels")
    assert limit == Image.MAX_IMAGE_PIXELS  # the global is left alone


# --- data: URLs --------------------------------------------------------------------------


def test_data_url_round_trip() -> None:
    for media_type in ("image/png", "IMAGE/PNG", "image/jpeg", "image/jpg"):
        image = load_data_url(_data_url(_png(), media_type), MediaPolicy(), PARAM)
        assert image.size == (7, 5) and image.getpixel((0, 0)) == (10, 200, 30)
    # Line breaks in the payload and missing padding are tolerated.
    payload = base64.b64encode(_png()).decode().rstrip("=")
    wrapped = "\n".join(payload[i : i + 60] for i in range(0, len(payload), 60))
    assert load_data_url(f"data:image/png;base64,{wrapped}", MediaPolicy(), PARAM).size == (7, 5)


def test_bad_data_urls_are_refused() -> None:
    policy = MediaPolicy()
    png = _png()
    encoded = base64.b64encode(png).decode()
    noisy_png = _encode(_noise(64, 64), "PNG")
    cases = {
        "data:image/png;base64,!!!notbase64***": "base64",
        "data:image/png;base64,QUJD\u00e9": "base64",
        _data_url(b"hello", "text/plain"): "media type",
        "data:image/svg+xml;base64," + encoded: "media type",
        f"data:;base64,{encoded}": "media type",
        "data:image/png," + png.decode("latin-1"): "base64",
        "data:image/png;charset=utf-8," + encoded: "base64",
        "data:image/png;base64": "payload",
        _data_url(b"\x89PNG\r\n\x1a\n garbage"): "could not be read",
        _data_url(noisy_png[: len(noisy_png) // 2]): "decoded",  # truncated
    }
    for url, word in cases.items():
        _refused(lambda url=url: load_data_url(url, policy, PARAM), word)  # type: ignore[misc]


def test_data_url_size_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a payload over the limit must not be decoded")

    monkeypatch.setattr(media.base64, "b64decode", never)
    url = "data:image/png;base64," + "A" * 4_000_000
    _refused(lambda: load_data_url(url, MediaPolicy(max_bytes=1_000_000), PARAM), "characters")


def test_data_url_decoded_size_is_checked() -> None:
    png = _png(32, 32)
    policy = MediaPolicy(max_bytes=len(png) - 1)  # the encoded length is within the slack
    _refused(lambda: load_data_url(_data_url(png), policy, PARAM), "bytes")


@pytest.mark.anyio
async def test_load_image_url_takes_data_urls() -> None:
    image = await load_image_url(_data_url(_png()), MediaPolicy(), PARAM)
    assert image.mode == "RGB" and image.size == (7, 5)


# --- schemes and domains -----------------------------------------------------------------


@pytest.mark.anyio
async def test_other_schemes_are_refused() -> None:
    policy = MediaPolicy(allowed_domains=frozenset({"localhost"}))
    for url in (
        "file:///etc/passwd",
        "ftp://localhost/a.png",
        "/etc/passwd",
        "a.png",
        "gopher://localhost/",
        "",
    ):
        await _refused_async(url, policy, "http(s)")


@pytest.mark.anyio
async def test_http_is_refused_unless_domains_are_allowed() -> None:
    await _refused_async("https://example.com/a.png", MediaPolicy(), "--allowed-media-domains")
    only = MediaPolicy(allowed_domains=frozenset({"images.example.com"}))
    for url in (
        "https://example.com/a.png",
        "https://evil.images.example.com/a.png",  # exact match, not a suffix
        "https://images.example.com.evil.net/a.png",
        "http://user@evil.net/images.example.com",
    ):
        await _refused_async(url, only, "not in", "--allowed-media-domains")


# --- the address check -------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.254",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.254",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "240.0.0.1",
        "::",
        "::1",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "not an address",
        "",
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


def _fake_resolver(
    monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[str]]
) -> list[tuple[str, int]]:
    looked_up: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append((host, port))
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    monkeypatch.setattr(media, "_resolve", resolve)
    return looked_up


def _mock_client(
    monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
) -> None:
    def client(policy: MediaPolicy) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(handler), trust_env=False)

    monkeypatch.setattr(media, "_make_client", client)


@pytest.mark.anyio
async def test_a_name_resolving_to_a_private_address_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked_up = _fake_resolver(
        monkeypatch,
        {
            "internal.example.com": ["10.0.0.5"],
            "metadata.example.com": ["169.254.169.254"],
            "mixed.example.com": ["93.184.216.34", "192.168.0.7"],  # any bad answer refuses
            "mapped.example.com": ["::ffff:127.0.0.1"],
        },
    )
    hosts = ["internal", "metadata", "mixed", "mapped", "nowhere"]
    policy = MediaPolicy(allowed_domains=frozenset(f"{host}.example.com" for host in hosts))
    await _refused_async("http://internal.example.com/a.png", policy, "10.0.0.5", "private")
    await _refused_async("http://metadata.example.com/", policy, "169.254.169.254", "link-local")
    await _refused_async("https://mixed.example.com/a.png", policy, "192.168.0.7", "private")
    await _refused_async("http://mapped.example.com/a.png", policy, "loopback")
    await _refused_async("http://nowhere.example.com/a.png", policy, "resolved")
    assert ("internal.example.com", 80) in looked_up and ("mixed.example.com", 443) in looked_up


@pytest.mark.anyio
async def test_literal_ip_hosts_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up = _fake_resolver(monkeypatch, {})
    policy = MediaPolicy(allowed_domains=frozenset({"127.0.0.1", "[::1]", "169.254.169.254"}))
    await _refused_async("http://127.0.0.1:9/a.png", policy, "loopback")
    await _refused_async("http://[::1]:9/a.png", policy, "loopback")
    await _refused_async("http://169.254.169.254/latest/meta-data/", policy, "link-local")
    assert looked_up == []  # a literal IP is not looked up


@pytest.mark.anyio
async def test_https_is_pinned_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request goes to the IP that was checked, with the name in Host and TLS SNI."""
    _fake_resolver(monkeypatch, {"images.example.com": ["93.184.216.34"]})
    seen: list[httpx.Request] = []
    png = _png()

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/old.png":
            return httpx.Response(302, headers={"Location": "/new.png"})
        return httpx.Response(200, content=png, headers={"Content-Type": "image/png"})

    _mock_client(monkeypatch, handler)
    policy = MediaPolicy(allowed_domains=frozenset({"Images.Example.com"}))
    image = await load_image_url("https://images.example.com/old.png?x=1#frag", policy, PARAM)
    assert image.size == (7, 5)
    assert [str(r.url) for r in seen] == [
        "https://93.184.216.34/old.png?x=1",
        "https://93.184.216.34/new.png",
    ]
    for request in seen:
        assert request.headers["Host"] == "images.example.com"
        assert request.extensions["sni_hostname"] == "images.example.com"


def test_media_client_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    client = media._make_client(MediaPolicy(timeout_s=2.5))
    assert client.trust_env is False and client.follow_redirects is False
    assert client.timeout.connect == 2.5 and client.timeout.read == 2.5


# --- fetching from a real server ---------------------------------------------------------

IMAGE = _png(11, 3, (1, 2, 3))


class _Handler(BaseHTTPRequestHandler):
    """The test server's routes: see the `do_GET` table."""

    def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, Location=location)

    def _stream(self, chunks: int, chunk: bytes, pause_s: float = 0.0) -> None:
        try:
            for _ in range(chunks):
                self.wfile.write(chunk)
                self.wfile.flush()
                time.sleep(pause_s)
        except OSError:  # the client hung up, as it should
            pass

    def do_GET(self) -> None:  # http.server's name for it
        path, port = self.path, self.server.server_address[1]  # type: ignore[index]
        if path == "/image.png":
            self._send(200, IMAGE, Content_Type="image/png")
        elif path == "/pinned.png":  # only when asked for by name (the Host header)
            ok = self.headers["Host"] == f"img.test:{port}"
            self._send(200 if ok else 421, IMAGE if ok else b"wrong host")
        elif path == "/redirect":
            self._redirect("/image.png")
        elif path == "/redirect-absolute":
            self._redirect(f"http://127.0.0.1:{port}/image.png")
        elif path == "/redirect-other-host":
            self._redirect(f"http://localhost:{port}/image.png")
        elif path == "/redirect-other-port":
            self._redirect("http://127.0.0.1:1/image.png")
        elif path == "/redirect-https":
            self._redirect(f"https://127.0.0.1:{port}/image.png")
        elif path == "/redirect-no-location":
            self._send(302)
        elif path.startswith("/chain/"):  # /chain/N redirects N times, then is the image
            left = int(path.removeprefix("/chain/"))
            if left > 0:
                self._redirect(f"/chain/{left - 1}")
            else:
                self._send(200, IMAGE, Content_Type="image/png")
        elif path == "/huge-with-length":
            self.send_response(200)
            self.send_header("Content-Length", str(64 * 1024 * 1024))
            self.end_headers()
            self._stream(4, b"\0" * 65536)
        elif path == "/huge-without-length":  # HTTP/1.0: the body ends when the socket closes
            self.send_response(200)
            self.end_headers()
            self._stream(64, b"\0" * 65536)
        elif path == "/gzip":
            self._send(200, zlib.compress(IMAGE), Content_Encoding="gzip")
        elif path == "/slow-headers":
            time.sleep(2.0)
            self._send(200, IMAGE)
        elif path == "/slow-body":  # each read is quick, the whole body is not
            self.send_response(200)
            self.end_headers()
            self._stream(40, b"x", pause_s=0.1)
        elif path == "/not-an-image":
            self._send(200, b"<html>hello</html>", Content_Type="text/html")
        else:
            self._send(404, b"not found")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (a thread): its base URL."""
    with serving(_Handler) as url:
        yield url


LOCAL = frozenset({"127.0.0.1"})
TRUSTING = MediaPolicy(allowed_domains=LOCAL, allow_private_addresses=True, timeout_s=5.0)


@pytest.mark.anyio
async def test_loopback_is_refused_without_allow_private_addresses(server: str) -> None:
    policy = MediaPolicy(allowed_domains=LOCAL)
    await _refused_async(f"{server}/image.png", policy, "127.0.0.1", "loopback")


@pytest.mark.anyio
async def test_fetches_an_image(server: str) -> None:
    image = await load_image_url(f"{server}/image.png", TRUSTING, PARAM)
    assert image.mode == "RGB" and image.size == (11, 3) and image.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.anyio
async def test_connects_to_the_resolved_address_with_the_name_as_host(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up = _fake_resolver(monkeypatch, {"img.test": ["127.0.0.1"]})
    port = int(server.rsplit(":", 1)[1])
    policy = MediaPolicy(allowed_domains=frozenset({"img.test"}), allow_private_addresses=True)
    image = await load_image_url(f"http://img.test:{port}/pinned.png", policy, PARAM)
    assert image.size == (11, 3)
    assert looked_up == [("img.test", port)]


@pytest.mark.anyio
async def test_same_host_redirects_are_followed(server: str) -> None:
    for path in ("/redirect", "/redirect-absolute", "/chain/3"):
        image = await load_image_url(server + path, TRUSTING, PARAM)
        assert image.size == (11, 3), path


@pytest.mark.anyio
async def test_bad_redirects_are_refused(server: str) -> None:
    await _refused_async(f"{server}/redirect-other-host", TRUSTING, "redirect to another host")
    await _refused_async(f"{server}/redirect-other-port", TRUSTING, "redirect to another host")
    await _refused_async(f"{server}/redirect-https", TRUSTING, "redirect to another host")
    await _refused_async(f"{server}/redirect-no-location", TRUSTING, "302", "location")
    await _refused_async(f"{server}/chain/4", TRUSTING, "more than 3 times")
    one = MediaPolicy(allowed_domains=LOCAL, allow_private_addresses=True, max_redirects=1)
    await _refused_async(f"{server}/chain/2", one, "more than 1 times")
    assert (await load_image_url(f"{server}/chain/1", one, PARAM)).size == (11, 3)


@pytest.mark.anyio
async def test_a_redirect_is_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved and checked again after a redirect: here its answer changes to a
    private address in between (DNS rebinding), and nothing is fetched from it."""
    answers = iter([["93.184.216.34"], ["10.0.0.1"]])

    async def resolve(host: str, port: int) -> list[str]:
        return next(answers)

    monkeypatch.setattr(media, "_resolve", resolve)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "/image.png"})

    _mock_client(monkeypatch, handler)
    policy = MediaPolicy(allowed_domains=frozenset({"img.test"}))
    await _refused_async("http://img.test/start", policy, "10.0.0.1", "private")
    assert seen == ["http://93.184.216.34/start"]


@pytest.mark.anyio
async def test_every_hop_is_checked(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    real_check = media._checked_address

    async def spy(host: str, port: int, policy: MediaPolicy, param: str) -> str:
        address = await real_check(host, port, policy, param)
        checked.append(address)
        return address

    monkeypatch.setattr(media, "_checked_address", spy)
    image = await load_image_url(f"{server}/chain/2", TRUSTING, PARAM)
    assert image.size == (11, 3)
    assert checked == ["127.0.0.1"] * 3  # the URL and the targets of its two redirects


@pytest.mark.anyio
async def test_oversize_bodies_are_refused(server: str) -> None:
    small = MediaPolicy(allowed_domains=LOCAL, allow_private_addresses=True, max_bytes=100_000)
    started = time.monotonic()
    await _refused_async(f"{server}/huge-with-length", small, "67108864 bytes", "100000")
    await _refused_async(f"{server}/huge-without-length", small, "more than 100000 bytes")
    assert time.monotonic() - started < 3.0
    tight = MediaPolicy(allowed_domains=LOCAL, allow_private_addresses=True, max_bytes=20)
    await _refused_async(f"{server}/image.png", tight, "bytes")


@pytest.mark.anyio
async def test_timeouts_are_refused(server: str) -> None:
    quick = MediaPolicy(allowed_domains=LOCAL, allow_private_addresses=True, timeout_s=0.5)
    for path in ("/slow-headers", "/slow-body"):
        started = time.monotonic()
        await _refused_async(server + path, quick, "timed out after 0.5s")
        assert time.monotonic() - started < 1.5, path


@pytest.mark.anyio
async def test_http_errors_are_refused(server: str) -> None:
    await _refused_async(f"{server}/missing.png", TRUSTING, "HTTP 404")
    await _refused_async(f"{server}/gzip", TRUSTING, "gzip")
    await _refused_async(f"{server}/not-an-image", TRUSTING, "png, jpeg")


@pytest.mark.anyio
async def test_connection_errors_are_refused() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    await _refused_async(f"http://127.0.0.1:{port}/image.png", TRUSTING, "failed")
    await _refused_async("http://127.0.0.1:99999/image.png", TRUSTING, "malformed")
