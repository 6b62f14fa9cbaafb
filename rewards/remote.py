"""The JSON-over-HTTP scoring protocol, both sides: `http`, a scorer that asks a server, and the server's request
handling (rewards/serve.py runs it around any registered scorer).

    POST <url>   {"images": [<base64 PNG>, ...], "prompts": [str, ...], "metadata": [{...}, ...]}
    200          {"scores": [float, ...], "metrics": {"<name>": [float, ...], ...}}   (metrics optional)
    400          {"error": "<why the input cannot be scored>"}   (the group is dropped, as for any scorer)
    401          {"error": ...}   the server wants its token: header `Authorization: Bearer <token>`
    413          {"error": ...}   the body is larger than the server takes (lower batch_size)
    5xx / none   the server cannot answer now: the scorer tries again, then the reward service sends the batch again
    GET <url>/health   200 {"scorer": "<name>"}

Images are RGB PNGs of one size; N images, prompts and metadata entries per request, N scores back. Only JSON and PNG
cross the network, never pickle.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import http.client
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from rewards.base import RewardInputError, Scorer, ScoreResult, ScorerUnavailable

BACKOFF_FIRST_S = 0.5  # the http scorer's first wait before trying a server again; doubled after each try
BACKOFF_MAX_S = 8.0  # the longest wait between two tries
PROBE_TIMEOUT_S = 10.0  # the longest `check` waits for the server's health answer


def encode_png(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) image as base64 PNG text."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def open_png(text: Any, index: int, max_pixels: int) -> Image.Image:
    """Base64 PNG text as a PIL image whose header only is read, refused (RewardInputError) when it is not a PNG or
    has more than `max_pixels` pixels: nothing is decompressed, so a small file of a huge image costs nothing."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"])
    except (TypeError, ValueError, binascii.Error, OSError) as e:  # not text, bad base64, or not a PNG
        raise RewardInputError(f"image {index} is not base64 PNG ({type(e).__name__}: {e})") from None
    except Image.DecompressionBombError:  # PIL's own limit, above ours unless max_pixels is raised past it
        raise RewardInputError(f"image {index} has more pixels than PIL opens: at most {max_pixels} pixels per "
                               f"image") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RewardInputError(f"image {index} is {width}x{height} = {width * height} pixels: at most {max_pixels} "
                               f"pixels per image")
    return image


def decode_png(image: Image.Image, index: int) -> np.ndarray:
    """An opened PNG's pixels as a uint8 (H, W, 3) array; RewardInputError when its data is broken."""
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as e:  # a truncated or corrupt PNG
        raise RewardInputError(f"image {index} is not a readable PNG ({type(e).__name__}: {e})") from None


def decode_request(body: bytes, max_images: int, max_pixels: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """A request body as (uint8 (N, H, W, 3) images, prompts, metadata); RewardInputError naming what is wrong. The
    count of images and every image's size (from its PNG header) are checked before any pixel is decoded."""
    try:
        request = json.loads(body)
    except ValueError as e:
        raise RewardInputError(f"the request is not JSON ({e})") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list) or \
            not isinstance(request.get("prompts"), list):
        raise RewardInputError('the request must be {"images": [base64 PNG, ...], "prompts": [...], "metadata": '
                               '[{...}, ...]}')
    texts = request["images"]
    if len(texts) > max_images:
        raise RewardInputError(f"{len(texts)} images: at most {max_images} images per request")
    opened = [open_png(text, i, max_pixels) for i, text in enumerate(texts)]
    metadata = request.get("metadata") or [{} for _ in opened]
    if not opened or len(request["prompts"]) != len(opened) or len(metadata) != len(opened):
        raise RewardInputError(f"{len(opened)} images, {len(request['prompts'])} prompts and {len(metadata)} "
                               f"metadata entries: one of each per image, at least one image")
    if len({image.size for image in opened}) != 1:
        raise RewardInputError(f"the images differ in size: {sorted({image.size[::-1] for image in opened})}")
    if not all(isinstance(p, str) for p in request["prompts"]) or not all(isinstance(m, dict) for m in metadata):
        raise RewardInputError("prompts must be strings and metadata entries objects")
    return np.stack([decode_png(image, i) for i, image in enumerate(opened)]), list(request["prompts"]), list(metadata)


def encode_result(result: ScoreResult) -> bytes:
    metrics = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in result.metrics.items()}
    return json.dumps({"scores": np.asarray(result.scores, dtype=np.float64).tolist(), "metrics": metrics}).encode()


def read_token(path: str | Path, what: str) -> str:
    """The token in a file (surrounding whitespace dropped); `what` names the option in the error."""
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} = {str(path)!r}: no such file; give a file holding the server's token") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} = {str(path)!r}: cannot read it as text ({e})") from None
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{what} = {str(path)!r}: the token must be one word of printable characters, no spaces")
    return token


def token_matches(header: str | None, token: str) -> bool:
    """An Authorization header carries `Bearer <token>` (compared in constant time)."""
    return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())


class HttpScorer(Scorer):
    """Scores by asking a server that speaks the protocol above, `batch_size` images per request. Each request gets
    `timeout_s`; a server that is down, times out or answers 5xx / 429 is asked again after 0.5 s, 1 s, 2 s, ... (at
    most 8 s apart) until the whole call has taken `deadline_s`, then the batch is ScorerUnavailable (sent again by
    the reward service). `deadline_s` must end before the reward service's `rewards.timeout_s` kills the call (the
    preflight checks it). A 400 answer is the server refusing the input (the group is dropped). `token_file`: a file
    holding the server's token (`python -m rewards.serve --token-file`), sent with every request."""

    name = "http"

    @classmethod
    def check(cls, url: str = "", timeout_s: float = 30.0, deadline_s: float = 90.0, batch_size: int = 16,
              token_file: str | None = None) -> None:
        """The options as the constructor checks them, then the server asked for its health (GET <url>/health): one
        that does not answer, or refuses the token, raises naming the url. Run where the scorer's actors run; the
        constructor checks the options only, so that actors start while the server is down and their calls retry."""
        token = cls.check_options(url, timeout_s, deadline_s, batch_size, token_file)
        probe(url, token, min(float(timeout_s), PROBE_TIMEOUT_S))

    @classmethod
    def check_options(cls, url: str, timeout_s: float, deadline_s: float, batch_size: int,
                      token_file: str | None) -> str | None:
        """The options checked without asking the server (anywhere: the preflight of a job that joins a cluster
        too); returns the token read from `token_file`, None without one."""
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{cls.name}: url must be http(s)://host[:port]/path, got {url!r}")
        try:
            parts.port  # noqa: B018 - raises for a port that is not a number in 0..65535
        except ValueError:
            raise ValueError(f"{cls.name}: url {url!r}: the port must be a number in 0..65535") from None
        for option, value in (("timeout_s", timeout_s), ("deadline_s", deadline_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{cls.name}: {option} must be a number of seconds > 0, got {value!r}")
        if timeout_s > deadline_s:
            raise ValueError(f"{cls.name}: timeout_s = {timeout_s:g} (each request) must be <= deadline_s = "
                             f"{deadline_s:g} (the whole call, every try)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{cls.name}: batch_size must be an integer >= 1, got {batch_size!r}")
        return None if token_file is None else read_token(token_file, f"{cls.name}: token_file")

    def __init__(self, url: str = "", timeout_s: float = 30.0, deadline_s: float = 90.0, batch_size: int = 16,
                 token_file: str | None = None):
        self.token = self.check_options(url, timeout_s, deadline_s, batch_size, token_file)
        self.url, self.batch_size = url, batch_size
        self.timeout_s, self.deadline_s = float(timeout_s), float(deadline_s)

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        end = time.monotonic() + self.deadline_s  # one deadline for the whole call: every batch, every try
        scores, metrics = [], {}
        for start in range(0, len(images), self.batch_size):
            stop = min(start + self.batch_size, len(images))
            answer = self._post({"images": [encode_png(image) for image in images[start:stop]],
                                 "prompts": list(prompts[start:stop]), "metadata": list(metadata[start:stop])}, end)
            scores.append(self._array(answer.get("scores"), stop - start, "scores"))
            for key, values in (answer.get("metrics") or {}).items():
                metrics.setdefault(key, []).append(self._array(values, stop - start, f"metrics.{key}"))
        return ScoreResult(np.concatenate(scores), {k: np.concatenate(v) for k, v in metrics.items()
                                                    if len(v) == len(scores)})

    def _post(self, request: dict, end: float | None = None) -> dict:
        """The server's answer to one request, tried again with exponential backoff while the server cannot answer,
        until `end` (time.monotonic(); default: deadline_s from now); then ScorerUnavailable naming the url, the tries
        and how long they took."""
        data = json.dumps(request).encode()
        began = time.monotonic()
        end = began + self.deadline_s if end is None else end
        wait, tries, last = BACKOFF_FIRST_S, 0, "no time left"
        while end - time.monotonic() > 0:
            tries += 1
            try:
                return self._send(data, min(self.timeout_s, end - time.monotonic()))
            except ScorerUnavailable as e:
                last = str(e)
            if time.monotonic() + wait >= end:
                break
            time.sleep(wait)
            wait = min(2 * wait, BACKOFF_MAX_S)
        raise ScorerUnavailable(f"{self.name} scorer at {self.url}: no answer within deadline_s = {self.deadline_s:g} "
                                f"s ({tries} tries over {time.monotonic() - began:.1f} s; last: {last})")

    def _send(self, data: bytes, timeout_s: float) -> dict:
        """One POST of `data`: the answer, or ScorerUnavailable (to try again), RewardInputError (400) or RuntimeError
        (an answer that trying again will not change)."""
        call = urllib.request.Request(self.url, data=data, method="POST", headers=self._headers())
        try:
            with urllib.request.urlopen(call, timeout=timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            raise self._refusal(e, len(data)) from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short: the server's trouble
            raise ScorerUnavailable(f"{getattr(e, 'reason', e) or type(e).__name__} (timeout {timeout_s:.3g} s)") \
                from None
        try:
            answer = json.loads(body)
        except ValueError:
            raise RuntimeError(f"{self.name} scorer at {self.url}: the answer is not JSON: {body[:200]!r}") from None
        if not isinstance(answer, dict):
            raise RuntimeError(f"{self.name} scorer at {self.url}: the answer must be a JSON object, got "
                               f"{type(answer).__name__}")
        return answer

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _refusal(self, e: urllib.error.HTTPError, size: int) -> Exception:
        """The exception for an HTTP error answer: 5xx / 429 can be tried again, the others cannot."""
        why = _error_text(e)
        where = f"{self.name} scorer at {self.url}"
        if e.code >= 500 or e.code == 429:
            return ScorerUnavailable(f"HTTP {e.code}: {why}")
        if e.code == 400:
            return RewardInputError(f"{where}: the server refused the input: {why}")
        if e.code == 401:
            return RuntimeError(f"{where}: HTTP 401: {why}; give the server's token in the option token_file")
        if e.code == 413:
            return RuntimeError(f"{where}: HTTP 413: a request of {size} bytes is too large for the server ({why}); "
                                f"lower batch_size")
        return RuntimeError(f"{where}: HTTP {e.code}: {why}; is the url right?")

    def _array(self, values: Any, n: int, what: str) -> np.ndarray:
        try:
            array = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            array = None
        if array is None or array.shape != (n,):
            raise RuntimeError(f"{self.name} scorer at {self.url}: the answer's {what} must be {n} numbers, got "
                               f"{str(values)[:200]}")
        return array


def probe(url: str, token: str | None, timeout_s: float) -> None:
    """A server answers GET <url>/health: ScorerUnavailable naming the url when none does (refused, no such host, no
    answer within timeout_s), RuntimeError when it refuses the token (401). Any other HTTP answer passes: a server is
    there, and servers written to this protocol may serve their health check at another path."""
    parts = urllib.parse.urlsplit(url)
    health = urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/health", query="", fragment=""))
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(health, headers=headers), timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise RuntimeError(f"url {url!r}: GET {health} answered HTTP 401 ({_error_text(e)}); give the server's "
                               f"token in token_file") from None
    except (OSError, http.client.HTTPException) as e:
        raise ScorerUnavailable(f"url {url!r}: no server answers there (GET {health}: "
                                f"{getattr(e, 'reason', e) or type(e).__name__}, timeout {timeout_s:g} s)") from None


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read()
        return str(json.loads(body).get("error", body[:200]))
    except Exception:  # no body, or not JSON: the status line says enough
        return e.reason if isinstance(e.reason, str) else str(e)
