"""Serve any registered scorer over HTTP (the protocol in rewards/remote.py), for jobs that use the `http` scorer:

    python -m rewards.serve --scorer pickscore [--option model=/models/pickscore ...] [--host 127.0.0.1] [--port 8765]

Binds 127.0.0.1 unless --host says otherwise. Requests are scored one at a time (scorers are not thread-safe); the
health check answers meanwhile. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

from rewards.base import RewardInputError, Scorer
from rewards.remote import MAX_REQUEST_BYTES, decode_request, encode_result


def make_server(scorer: Scorer, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call serve_forever) that scores POSTs with `scorer`; port 0: any free one."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict | bytes) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.rstrip("/").endswith("/health"):
                self._answer(200, {"scorer": scorer.name})
            else:
                self._answer(404, {"error": f"GET {self.path}: only /health; POST images to score them"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_REQUEST_BYTES:
                self._answer(413 if length > 0 else 400,
                             {"error": f"Content-Length {length}: a request body of 1..{MAX_REQUEST_BYTES} bytes"})
                return
            body = self.rfile.read(length)
            try:
                images, prompts, metadata = decode_request(body)
                with lock:
                    result = scorer(images, prompts, metadata)
            except RewardInputError as e:
                self._answer(400, {"error": str(e)})
                return
            except Exception as e:  # the scorer failed: the client sees why (500), the server keeps serving
                self._answer(500, {"error": f"{type(e).__name__}: {e}"})
                return
            self._answer(200, encode_result(result))

        def log_message(self, format: str, *args) -> None:  # one line per request is noise at training rates
            pass

    return ThreadingHTTPServer((host, port), Handler)


def parse_options(pairs: list[str]) -> dict:
    """--option key=value pairs, values read as YAML (numbers, booleans, lists)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {pair!r}: expected key=value, e.g. --option device=cuda")
        options[key] = yaml.safe_load(value)
    return options


def main(argv: list[str] | None = None) -> int:
    from rewards.registry import build, registered

    ap = argparse.ArgumentParser(prog="python -m rewards.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--scorer", required=True, help=f"one of: {', '.join(n for n in registered() if n != 'http')}")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a scorer option (repeatable)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8765, help="0: any free port")
    args = ap.parse_args(argv)
    if args.scorer not in registered() or args.scorer == "http":
        print(f"error: --scorer {args.scorer!r}: not a registered scorer; allowed: "
              f"{', '.join(n for n in registered() if n != 'http')}", file=sys.stderr)
        return 2
    try:
        scorer = build(args.scorer, **parse_options(args.option))
        server = make_server(scorer, args.host, args.port)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
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
