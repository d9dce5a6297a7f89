"""Loading the images of a chat request's `image_url` content parts, safely.

An image URL is either a `data:image/...;base64,` URL or an http(s) URL that the server
fetches. Both are attacker-controlled input, so every step is bounded and every failure is
an `InvalidRequestError` (HTTP 400) naming the request parameter:

* Server-side request forgery (SSRF; vLLM has had CVEs of this kind). Fetching is off until
  the operator allows domains (`--allowed-media-domains`, `MediaPolicy.allowed_domains`); a
  URL's host must be one of them exactly. The host is resolved once and refused if any of its
  addresses is not globally routable (loopback, private, link-local such as the cloud
  metadata address 169.254.169.254, multicast, reserved, carrier-grade NAT, and IPv6 forms
  embedding those). The connection then goes to the address that was checked (the URL carries
  the IP, the Host header and TLS SNI the name), so a second DNS answer cannot rebind it.
  Redirects are followed by hand, a few at most, only to the same scheme and host, and are
  checked again. Proxies from the environment are ignored.
* Resource exhaustion. A body is streamed and dropped as soon as it passes `max_bytes`; the
  whole fetch has one deadline; a data URL's length is checked before it is decoded.
* Decompression bombs. An image's width and height are read from its header and checked
  against `max_pixels` before any pixel is decoded; Pillow's own bomb guard is turned into a
  400 too (its global `Image.MAX_IMAGE_PIXELS` is neither relied on nor changed).

Only PNG, JPEG, WebP and GIF (first frame) are decoded; the result is a fully loaded RGB
image, transparency composited onto white.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from tokenmill.errors import InvalidRequestError

# Pillow format names that may be decoded (Image.open tries only these plugins).
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
# data: URL media types accepted ("image/jpg" is not registered but clients send it).
_DATA_URL_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CARRIER_GRADE_NAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True, slots=True)
class MediaPolicy:
    """What a request's image URLs may do; the server builds one from its flags."""

    # None: http(s) URLs are refused. Else a URL's host must equal one of these (exact
    # hostname match, case-insensitive), as vLLM's --allowed-media-domains.
    allowed_domains: frozenset[str] | None = None
    max_bytes: int = 20 * 1024 * 1024  # a downloaded body, a decoded data: URL payload
    timeout_s: float = 10.0  # the whole fetch of one URL (resolve, connect, redirects, body)
    max_pixels: int = 40_000_000  # width * height, checked before pixels are decoded
    max_redirects: int = 3
    # True only for tests and trusted setups: skip the private/loopback address check.
    allow_private_addresses: bool = False
    # True only where the caller is trusted (the offline API: it runs the caller's own
    # script): any host, as vLLM's LLM.chat fetches
    allow_any_domain: bool = False


# --- decoding ----------------------------------------------------------------------------


def decode_image(data: bytes, policy: MediaPolicy, param: str) -> Image.Image:
    """Bytes -> an RGB PIL image (fully loaded). PNG, JPEG, WebP, GIF (first frame).

    Refuses too many bytes, an unknown or corrupt format, a truncated file and an image of
    more than `policy.max_pixels` pixels (read from the header, before pixel data is decoded).
    Every failure is an InvalidRequestError naming `param`."""
    if len(data) > policy.max_bytes:
        raise InvalidRequestError(
            f"image is {len(data)} bytes; the limit is {policy.max_bytes}", param=param
        )
    try:
        # Image.open reads only the header; Pillow's own bomb guard may raise here.
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(exc, policy, param) from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidRequestError(
            "image is not a PNG, JPEG, WebP or GIF image (or is corrupt)", param=param
        ) from exc
    except Exception as exc:  # Pillow's plugins raise many kinds on malformed headers
        raise InvalidRequestError(
            f"image could not be read: {_describe(exc)}", param=param
        ) from exc
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidRequestError(f"image has no pixels ({width}x{height})", param=param)
        if width * height > policy.max_pixels:
            raise InvalidRequestError(
                f"image is {width}x{height} = {width * height} pixels; "
                f"the limit is {policy.max_pixels}",
                param=param,
            )
        try:
            image.seek(0)  # the first frame of an animation
            image.load()  # decodes the pixels; raises on a truncated or corrupt file
            return _to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_many_pixels(exc, policy, param) from exc
        except Exception as exc:  # OSError (truncated), SyntaxError, ValueError, EOFError, ...
            raise InvalidRequestError(
                f"image could not be decoded: {_describe(exc)}", param=param
            ) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image of `image`; transparent pixels are composited onto white."""
    if image.mode == "RGB":
        return image.copy()
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def _too_many_pixels(exc: Exception, policy: MediaPolicy, param: str) -> InvalidRequestError:
    """Pillow's own decompression-bomb guard tripped (its message names the pixel counts)."""
    return InvalidRequestError(
        f"image has too many pixels to decode safely ({str(exc).rstrip('.')}); "
        f"this server's limit is {min(policy.max_pixels, _pillow_limit())} pixels",
        param=param,
    )


def _pillow_limit() -> int:
    """The most pixels Pillow opens without raising (read, never changed)."""
    limit = Image.MAX_IMAGE_PIXELS
    return 2 * limit if limit is not None else 2**63


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- data: URLs --------------------------------------------------------------------------


def load_data_url(url: str, policy: MediaPolicy, param: str) -> Image.Image:
    """data:image/<png|jpeg|webp|gif>;base64,<payload> -> an RGB PIL image.

    Refuses other media types, data URLs that are not base64, invalid base64 and payloads
    over `policy.max_bytes` (the encoded length is checked first, so a huge payload is never
    decoded)."""
    if url[:5].lower() != "data:":
        raise InvalidRequestError("not a data: URL", param=param)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidRequestError("data: URL has no ',' before its payload", param=param)
    media_type, *parameters = (part.strip().lower() for part in header.split(";"))
    if media_type not in _DATA_URL_TYPES:
        shown = media_type[:50] or "(none)"
        raise InvalidRequestError(
            f"data: URL media type {shown!r} is not supported; "
            "use image/png, image/jpeg, image/webp or image/gif",
            param=param,
        )
    if not parameters or parameters[-1] != "base64":
        raise InvalidRequestError(
            "data: URL must be base64-encoded (data:image/...;base64,...)", param=param
        )
    # 4 characters per 3 bytes, plus some room for line breaks some encoders add.
    max_encoded = 4 * -(-policy.max_bytes // 3)
    if len(payload) > max_encoded + max_encoded // 64 + 4:
        raise InvalidRequestError(
            f"data: URL payload is {len(payload)} characters, more than {policy.max_bytes} "
            "bytes once decoded (the limit)",
            param=param,
        )
    payload = "".join(payload.split())  # drop line breaks and spaces
    payload += "=" * (-len(payload) % 4)  # tolerate missing padding
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(
            f"data: URL payload is not valid base64: {exc}", param=param
        ) from exc
    if len(data) > policy.max_bytes:
        raise InvalidRequestError(
            f"image is {len(data)} bytes; the limit is {policy.max_bytes}", param=param
        )
    return decode_image(data, policy, param)


# --- any image URL -----------------------------------------------------------------------


async def load_image_url(url: str, policy: MediaPolicy, param: str) -> Image.Image:
    """Any `image_url` value -> an RGB PIL image: a data: URL, or an http(s) URL fetched under
    `policy`. Other schemes (file://, ftp://, bare paths) are refused. Every failure is an
    InvalidRequestError naming `param`."""
    scheme = url.partition(":")[0].strip().lower() if ":" in url else ""
    if scheme == "data":
        return await asyncio.to_thread(load_data_url, url.strip(), policy, param)
    if scheme in ("http", "https"):
        data = await _fetch(url.strip(), policy, param)
        return await asyncio.to_thread(decode_image, data, policy, param)
    shown = f"scheme {scheme[:20]!r}" if scheme else "no scheme"
    raise InvalidRequestError(
        f"image URL has {shown}; use an http(s) URL or a data:image/...;base64 URL",
        param=param,
    )


# --- addresses ---------------------------------------------------------------------------


def is_public_address(addr: str) -> bool:
    """Whether `addr` (an IPv4 or IPv6 address) is globally routable, so a fetch from it cannot
    reach this machine, its network or the cloud's metadata service. False for anything
    that is not an IP address."""
    try:
        return _address_problem(ipaddress.ip_address(addr)) is None
    except ValueError:
        return False


def _address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes `ip` unsafe to fetch from ("a loopback address", ...), None if nothing."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _address_problem(ip.ipv4_mapped)  # ::ffff:a.b.c.d is a.b.c.d
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in _embedded_ipv4(ip):
            problem = _address_problem(embedded)
            if problem is not None:
                return f"{problem} (embedded in {ip})"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CARRIER_GRADE_NAT:
        return "a carrier-grade NAT address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "not a globally routable address"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: 6to4, Teredo, NAT64."""
    found: list[ipaddress.IPv4Address] = []
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


async def _resolve(host: str, port: int) -> list[str]:
    """The addresses of `host`, by the event loop's resolver (tests replace this)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def _checked_address(host: str, port: int, policy: MediaPolicy, param: str) -> str:
    """The address to connect to for `host`: resolved once, every answer checked."""
    try:
        addresses = [str(ipaddress.ip_address(host))]  # a literal IP is not looked up
    except ValueError:
        try:
            addresses = await _resolve(host, port)
        except OSError as exc:  # socket.gaierror
            raise InvalidRequestError(
                f"image URL host {host!r} could not be resolved: {exc}", param=param
            ) from exc
    if not addresses:
        raise InvalidRequestError(f"image URL host {host!r} has no address", param=param)
    if not policy.allow_private_addresses:
        for address in addresses:
            try:
                problem = _address_problem(ipaddress.ip_address(address))
            except ValueError:
                problem = "not an IP address"
            if problem is not None:
                raise InvalidRequestError(
                    f"image URL host {host!r} resolves to {address}, {problem}; "
                    "only public addresses may be fetched",
                    param=param,
                )
    return addresses[0]


# --- http(s) fetching --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    """An http(s) URL taken apart: what to connect to and what to ask for."""

    scheme: str  # "http" or "https"
    host: str  # lowercased hostname, IPv6 without brackets
    port: int  # explicit or the scheme's default
    host_header: str  # the Host header: the host, and the port when it is not the default
    path_and_query: str  # "/path?query", never empty

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    def url_for(self, address: str) -> str:
        """This URL with `address` (a checked IP) in place of the host."""
        shown = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{shown}:{self.port}{self.path_and_query}"


def _parse_target(url: str, param: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequestError(f"image URL is malformed: {exc}", param=param) from exc
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in _DEFAULT_PORTS:
        raise InvalidRequestError(f"image URL scheme {scheme!r} is not http(s)", param=param)
    if not host:
        raise InvalidRequestError("image URL has no host", param=param)
    default_port = _DEFAULT_PORTS[scheme]
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port in (None, default_port) else f"{shown_host}:{port}"
    path_and_query = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, port or default_port, host_header, path_and_query)


def _check_domain(target: _Target, policy: MediaPolicy, param: str) -> None:
    if policy.allow_any_domain:
        return
    if policy.allowed_domains is None:
        raise InvalidRequestError(
            "image URLs over http(s) are disabled on this server; its operator can allow "
            "domains with --allowed-media-domains (or send the image as a data: URL)",
            param=param,
        )
    allowed = {domain.strip().strip("[]").rstrip(".").lower() for domain in policy.allowed_domains}
    if target.host not in allowed:
        raise InvalidRequestError(
            f"image URL host {target.host!r} is not in the server's --allowed-media-domains",
            param=param,
        )


def _make_client(policy: MediaPolicy) -> httpx.AsyncClient:
    """The HTTP client of one fetch: no automatic redirects, no proxies from the environment
    (tests replace this to watch the requests)."""
    return httpx.AsyncClient(follow_redirects=False, timeout=policy.timeout_s, trust_env=False)


async def _fetch(url: str, policy: MediaPolicy, param: str) -> bytes:
    """The body of the http(s) `url` under `policy`; every failure is an InvalidRequestError."""
    target = _parse_target(url, param)
    _check_domain(target, policy, param)
    try:
        async with asyncio.timeout(policy.timeout_s), _make_client(policy) as client:
            return await _follow(client, target, policy, param)
    except InvalidRequestError:
        raise
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise InvalidRequestError(
            f"fetching the image timed out after {policy.timeout_s:g}s", param=param
        ) from exc
    except httpx.HTTPError as exc:  # connection refused or reset, protocol errors, TLS, ...
        raise InvalidRequestError(
            f"fetching the image failed: {_describe(exc)}", param=param
        ) from exc
    except Exception as exc:  # OSError, ValueError, httpx.InvalidURL; never let one escape
        raise InvalidRequestError(
            f"fetching the image failed: {_describe(exc)}", param=param
        ) from exc


async def _follow(
    client: httpx.AsyncClient, target: _Target, policy: MediaPolicy, param: str
) -> bytes:
    """GET `target`, following at most `policy.max_redirects` same-origin redirects."""
    for redirects in range(policy.max_redirects + 1):
        address = await _checked_address(target.host, target.port, policy, param)
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        headers = {
            "Host": target.host_header,
            "Accept": "image/*",
            "Accept-Encoding": "identity",  # no compressed bodies (a gzip bomb is a bomb too)
        }
        request = client.build_request(
            "GET", target.url_for(address), headers=headers, extensions=extensions
        )
        response = await client.send(request, stream=True)
        try:
            if response.status_code not in _REDIRECT_STATUSES:
                return await _read_body(response, policy, param)
            location = response.headers.get("Location")
        finally:
            await response.aclose()
        if not location:
            raise InvalidRequestError(
                f"image URL answered HTTP {response.status_code} without a Location",
                param=param,
            )
        if redirects == policy.max_redirects:
            raise InvalidRequestError(
                f"image URL redirected more than {policy.max_redirects} times", param=param
            )
        current = f"{target.scheme}://{target.host_header}{target.path_and_query}"
        next_target = _parse_target(urljoin(current, location), param)
        if next_target.origin != target.origin:
            raise InvalidRequestError(
                f"image URL answered with a redirect to another host "
                f"({next_target.scheme}://{next_target.host_header}); only redirects to the "
                "same scheme and host are followed",
                param=param,
            )
        target = next_target
    raise AssertionError("unreachable: the loop returns or raises")


async def _read_body(response: httpx.Response, policy: MediaPolicy, param: str) -> bytes:
    """A 2xx response's body, at most `policy.max_bytes` of it."""
    if not 200 <= response.status_code < 300:
        raise InvalidRequestError(
            f"image URL answered HTTP {response.status_code} {response.reason_phrase}".rstrip(),
            param=param,
        )
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise InvalidRequestError(
            f"image URL answered with a {encoding!r}-encoded body; only unencoded bodies are "
            "accepted",
            param=param,
        )
    too_big = f"image URL's body is more than {policy.max_bytes} bytes (the limit)"
    length = response.headers.get("Content-Length", "")
    if length.strip().isdigit() and int(length) > policy.max_bytes:
        raise InvalidRequestError(
            f"image URL's body is {int(length)} bytes; the limit is {policy.max_bytes}",
            param=param,
        )
    body = bytearray()
    async for chunk in response.aiter_bytes():  # not decoded: the encoding is identity
        body += chunk
        if len(body) > policy.max_bytes:
            raise InvalidRequestError(too_big, param=param)
    return bytes(body)


async def load_images(
    urls: list[tuple[str, str]], policy: MediaPolicy, max_images: int
) -> list[Image.Image]:
    """A request's images, fetched and decoded concurrently: (url, param) pairs in prompt
    order. More than `max_images` is a 400 before anything is fetched; the first failure
    cancels the other fetches and is the request's 400."""
    if len(urls) > max_images:
        raise InvalidRequestError(
            f"at most {max_images} images may be sent in one request (--limit-mm-per-prompt); "
            f"got {len(urls)}",
            param=urls[max_images][1],
        )
    if not urls:
        return []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(load_image_url(url, policy, param)) for url, param in urls]
    except* InvalidRequestError as errors:
        raise errors.exceptions[0] from None
    return [task.result() for task in tasks]
