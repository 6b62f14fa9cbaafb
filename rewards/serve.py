"""Serve any registered scorer over HTTP (the protocol in rewards/remote.py), for jobs that use the `http` scorer:

    python -m rewards.serve --scorer pickscore [--option model=/models/pickscore ...] [--host 127.0.0.1] [--port 8765]
        [--token-file PATH] [--max-body-mib 64] [--max-images 256] [--max-pixels 16777216] [--timeout-s 30]
        [--workers 8]

Binds 127.0.0.1 unless --host says otherwise. Requests are scored one at a time (scorers are not thread-safe); the
health check answers meanwhile. What one request may hold is limited, and checked before any pixel is decoded: a
larger body is answered 413 unread, too many images or pixels 400. At most --workers connections are served at once
(more wait in the listen queue), and a connection silent for --timeout-s is closed. With --token-file every request
must carry `Authorization: Bearer <token>`, else 401. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

from rewards.base import RewardInputError, Scorer
from rewards.remote import decode_request, encode_result, read_token, token_matches

MIB = 2**20


@dataclass(frozen=True)
class Limits:
    """What the server takes: bytes of one request body, images per request, pixels per image, seconds a connection
    may stay silent, connections served at once."""

    max_body_bytes: int = 64 * MIB
    max_images: int = 256
    max_pixels: int = 4096 * 4096
    timeout_s: float = 30.0
    workers: int = 8

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images", "max_pixels", "timeout_s", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `workers` at once: the accept loop waits for a free slot, and connections
    beyond it wait in the listen queue."""

    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], workers: int):
        self.slots = threading.BoundedSemaphore(workers)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        self.slots.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its slot is free again
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """One line for a connection that failed (reset, cut short), not a traceback."""
        error = sys.exc_info()[1]
        print(f"[flowrl] connection from {client_address[0]}: {type(error).__name__}: {error}", file=sys.stderr)


def make_server(scorer: Scorer, host: str = "127.0.0.1", port: int = 0, limits: Limits = Limits(),
                token: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call serve_forever) that scores POSTs with `scorer` within `limits`; port 0:
    any free one. With `token`, every request must carry `Authorization: Bearer <token>`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = limits.timeout_s  # on every read and write of the connection (StreamRequestHandler sets it)

        def _answer(self, status: int, body: dict | bytes) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            """The request carries the token (or none is wanted); else it is answered 401."""
            if token is None or token_matches(self.headers.get("Authorization"), token):
                return True
            self._answer(401, {"error": "missing or wrong token: send the header 'Authorization: Bearer <token>' "
                                        "with the token of the server's --token-file"})
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not self._authorized():
                return
            if self.path.rstrip("/").endswith("/health"):
                self._answer(200, {"scorer": scorer.name})
            else:
                self._answer(404, {"error": f"GET {self.path}: only /health; POST images to score them"})

        def do_POST(self) -> None:  # noqa: N802
            length = self._length()
            if length is None:
                return
            if not self._authorized():
                self._discard(length)  # read what the client sends, so that it gets the 401 rather than a reset
                return
            body = self.rfile.read(length)
            if len(body) < length:
                self._answer(400, {"error": f"the body ended after {len(body)} of {length} bytes (Content-Length)"})
                return
            try:
                images, prompts, metadata = decode_request(body, limits.max_images, limits.max_pixels)
                with lock:
                    result = scorer(images, prompts, metadata)
            except RewardInputError as e:
                self._answer(400, {"error": str(e)})
                return
            except Exception as e:  # the scorer failed: the client sees why (500), the server keeps serving
                self._answer(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._answer(200, encode_result(result))

        def _length(self) -> int | None:
            """The body's Content-Length, or None once the request is answered 400 (no number) or 413 (larger
            than max_body_bytes: the body is left unread)."""
            text = self.headers.get("Content-Length") or "0"
            length = int(text) if text.isdigit() else 0
            if 0 < length <= limits.max_body_bytes:
                return length
            status = 413 if length > limits.max_body_bytes else 400
            self._answer(status, {"error": f"Content-Length {text}: a request body of 1..{limits.max_body_bytes} "
                                           f"bytes (--max-body-mib)"})
            return None

        def _discard(self, length: int) -> None:
            """Read and drop `length` bytes of body, a MiB at a time."""
            while length > 0:
                chunk = self.rfile.read(min(length, MIB))
                if not chunk:
                    return
                length -= len(chunk)

        def log_message(self, format: str, *args) -> None:  # one line per request is noise at training rates
            pass

    return BoundedServer((host, port), Handler, limits.workers)


def parse_options(pairs: list[str]) -> dict:
    """--option key=value pairs, values read as YAML (numbers, booleans, lists)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {pair!r}: expected key=value, e.g. --option device=cuda")
        options[key] = yaml.safe_load(value)
    return options


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` > 0."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a {kind.__name__} > 0")
        return value

    return parse


def loopback(host: str) -> bool:
    """`host` is a loopback address or localhost (only this machine can connect)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    from rewards.registry import build, registered

    defaults = Limits()
    ap = argparse.ArgumentParser(prog="python -m rewards.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--scorer", required=True, help=f"one of: {', '.join(n for n in registered() if n != 'http')}")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a scorer option (repeatable)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8765, help="0: any free port")
    ap.add_argument("--token-file", metavar="PATH", help="a file holding a token that every request must carry "
                                                         "(header 'Authorization: Bearer <token>'), else 401")
    ap.add_argument("--max-body-mib", type=positive(float), default=defaults.max_body_bytes / MIB,
                    help="largest request body in MiB; larger: 413 (default %(default)g)")
    ap.add_argument("--max-images", type=positive(int), default=defaults.max_images,
                    help="most images per request; more: 400 (default %(default)d)")
    ap.add_argument("--max-pixels", type=positive(int), default=defaults.max_pixels,
                    help="most pixels (width x height) per image, read from the PNG header; more: 400 "
                         "(default %(default)d = 4096x4096)")
    ap.add_argument("--timeout-s", type=positive(float), default=defaults.timeout_s,
                    help="seconds a connection may stay silent before it is closed (default %(default)g)")
    ap.add_argument("--workers", type=positive(int), default=defaults.workers,
                    help="connections served at once; more wait (default %(default)d)")
    args = ap.parse_args(argv)
    if args.scorer not in registered() or args.scorer == "http":
        print(f"error: --scorer {args.scorer!r}: not a registered scorer; allowed: "
              f"{', '.join(n for n in registered() if n != 'http')}", file=sys.stderr)
        return 2
    try:
        token = None if args.token_file is None else read_token(args.token_file, "--token-file")
        limits = Limits(int(args.max_body_mib * MIB), args.max_images, args.max_pixels, args.timeout_s, args.workers)
        scorer = build(args.scorer, **parse_options(args.option))
        server = make_server(scorer, args.host, args.port, limits, token)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    if token is None and not loopback(host):
        print(f"[flowrl] warning: {host} is reachable from other machines and no --token-file is given: anyone who "
              f"reaches port {port} can use this scorer", file=sys.stderr)
    print(f"[flowrl] serving scorer {args.scorer!r} at http://{host}:{port}/score (health: /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
