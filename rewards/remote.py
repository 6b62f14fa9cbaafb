"""The JSON-over-HTTP scoring protocol, both sides: `http`, a scorer that asks a server, and the server's request
handling (rewards/serve.py runs it around any registered scorer).

    POST <url>   {"images": [<base64 PNG>, ...], "prompts": [str, ...], "metadata": [{...}, ...]}
    200          {"scores": [float, ...], "metrics": {"<name>": [float, ...], ...}}   (metrics optional)
    400          {"error": "<why the input cannot be scored>"}   (the group is dropped, as for any scorer)
    5xx / none   the server cannot answer now: the reward service sends the batch again (rewards.max_retries)
    GET <url>/health   200 {"scorer": "<name>"}

Images are RGB PNGs of one size; N images, prompts and metadata entries per request, N scores back. Only JSON and PNG
cross the network, never pickle.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from rewards.base import RewardInputError, Scorer, ScoreResult, ScorerUnavailable

MAX_REQUEST_BYTES = 512 * 2**20  # what a server reads of one request at most


def encode_png(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) image as base64 PNG text."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
    """Base64 PNG text as a uint8 (H, W, 3) image; RewardInputError for anything else."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=["PNG"])
        return np.asarray(image.convert("RGB"))
    except Exception as e:  # bad base64 or not a PNG: one message
        raise RewardInputError(f"an image is not base64 PNG ({type(e).__name__}: {e})") from None


def decode_request(body: bytes) -> tuple[np.ndarray, list[str], list[dict]]:
    """A request body as (uint8 (N, H, W, 3) images, prompts, metadata); RewardInputError naming what is wrong."""
    try:
        request = json.loads(body)
    except ValueError as e:
        raise RewardInputError(f"the request is not JSON ({e})") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list) or \
            not isinstance(request.get("prompts"), list):
        raise RewardInputError('the request must be {"images": [base64 PNG, ...], "prompts": [...], "metadata": '
                               '[{...}, ...]}')
    images = [decode_png(text) for text in request["images"]]
    metadata = request.get("metadata") or [{} for _ in images]
    if not images or len(request["prompts"]) != len(images) or len(metadata) != len(images):
        raise RewardInputError(f"{len(images)} images, {len(request['prompts'])} prompts and {len(metadata)} "
                               f"metadata entries: one of each per image, at least one image")
    if len({image.shape for image in images}) != 1:
        raise RewardInputError(f"the images differ in size: {sorted({image.shape[:2] for image in images})}")
    if not all(isinstance(p, str) for p in request["prompts"]) or not all(isinstance(m, dict) for m in metadata):
        raise RewardInputError("prompts must be strings and metadata entries objects")
    return np.stack(images), list(request["prompts"]), list(metadata)


def encode_result(result: ScoreResult) -> bytes:
    metrics = {k: np.asarray(v, dtype=np.float64).tolist() for k, v in result.metrics.items()}
    return json.dumps({"scores": np.asarray(result.scores, dtype=np.float64).tolist(), "metrics": metrics}).encode()


class HttpScorer(Scorer):
    """Scores by asking a server that speaks the protocol above, `batch_size` images per request, each request given
    `timeout_s`. A server that is down, times out or answers 5xx makes the batch ScorerUnavailable (sent again by the
    reward service); a 400 answer is the server refusing the input (the group is dropped)."""

    name = "http"

    @classmethod
    def check(cls, url: str = "", timeout_s: float = 60.0, batch_size: int = 16) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{cls.name}: url must be http(s)://host[:port]/path, got {url!r}")
        if not timeout_s > 0:
            raise ValueError(f"{cls.name}: timeout_s must be > 0, got {timeout_s}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{cls.name}: batch_size must be an integer >= 1, got {batch_size!r}")

    def __init__(self, url: str = "", timeout_s: float = 60.0, batch_size: int = 16):
        self.check(url=url, timeout_s=timeout_s, batch_size=batch_size)
        self.url, self.timeout_s, self.batch_size = url, float(timeout_s), batch_size

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreResult:
        scores, metrics = [], {}
        for start in range(0, len(images), self.batch_size):
            stop = min(start + self.batch_size, len(images))
            answer = self._post({"images": [encode_png(image) for image in images[start:stop]],
                                 "prompts": list(prompts[start:stop]), "metadata": list(metadata[start:stop])})
            scores.append(self._array(answer.get("scores"), stop - start, "scores"))
            for key, values in (answer.get("metrics") or {}).items():
                metrics.setdefault(key, []).append(self._array(values, stop - start, f"metrics.{key}"))
        return ScoreResult(np.concatenate(scores), {k: np.concatenate(v) for k, v in metrics.items()
                                                    if len(v) == len(scores)})

    def _post(self, request: dict) -> dict:
        data = json.dumps(request).encode()
        call = urllib.request.Request(self.url, data=data, method="POST",
                                      headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(call, timeout=self.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            why = _error_text(e)
            if e.code == 400:
                raise RewardInputError(f"{self.name} scorer at {self.url}: the server refused the input: {why}") \
                    from None
            if e.code >= 500 or e.code == 429:
                raise ScorerUnavailable(f"{self.name} scorer at {self.url}: HTTP {e.code}: {why}") from None
            raise RuntimeError(f"{self.name} scorer at {self.url}: HTTP {e.code}: {why}; is the url right?") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise ScorerUnavailable(f"{self.name} scorer at {self.url}: no answer ({reason}; timeout "
                                    f"{self.timeout_s:g} s)") from None
        try:
            answer = json.loads(body)
        except ValueError:
            raise RuntimeError(f"{self.name} scorer at {self.url}: the answer is not JSON: {body[:200]!r}") from None
        if not isinstance(answer, dict):
            raise RuntimeError(f"{self.name} scorer at {self.url}: the answer must be a JSON object, got "
                               f"{type(answer).__name__}")
        return answer

    def _array(self, values: Any, n: int, what: str) -> np.ndarray:
        try:
            array = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            array = None
        if array is None or array.shape != (n,):
            raise RuntimeError(f"{self.name} scorer at {self.url}: the answer's {what} must be {n} numbers, got "
                               f"{str(values)[:200]}")
        return array


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read()
        return str(json.loads(body).get("error", body[:200]))
    except Exception:  # no body, or not JSON: the status line says enough
        return e.reason if isinstance(e.reason, str) else str(e)
