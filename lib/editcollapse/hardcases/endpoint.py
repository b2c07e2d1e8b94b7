"""HardEdit's endpoint back end: the paper's prompt sent to any OpenAI-compatible chat-completions server
(HARDEDIT_ENDPOINT, HARDEDIT_MODEL, HARDEDIT_API_KEY), each call within its timeout in all, 429 and 5xx
answers retried a bounded number of times."""
from __future__ import annotations

import asyncio
import email.utils
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from .generate import Generation, PromptGenerator


class EndpointGenerator(PromptGenerator):
    """An OpenAI-compatible chat-completions endpoint (POST {url}/chat/completions, or `url` itself when it ends
    in /chat/completions), through httpx.

    Each call ends within `timeout` seconds in all: connecting, sending, every byte of the answer, retries and
    waits. A 429 or 5xx answer is retried up to `max_retries` times, after its Retry-After (seconds or an HTTP
    date) or else `backoff` · 2^i seconds, either capped at `max_wait`; a wait that would pass the deadline is
    not made. `sleep` does the waiting (tests pass a fake). Every other failure becomes a failed Generation.
    """

    name = "endpoint"

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 temperature: float = 1.0, max_tokens: int = 2048, max_retries: int = 3, backoff: float = 1.0,
                 max_wait: float = 30.0, sleep=time.sleep, **kw):
        super().__init__(**kw)
        if not url or not model:
            raise ValueError("an endpoint needs a URL and a model name (HARDEDIT_ENDPOINT, HARDEDIT_MODEL)")
        for what, v, zero_ok in (("timeout", timeout, False), ("backoff", backoff, True), ("max_wait", max_wait, True)):
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not number or v < 0 or (v == 0 and not zero_ok):
                raise ValueError(f"{what} must be a finite number of seconds {'>= 0' if zero_ok else '> 0'}, not {v!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, not {max_retries!r}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, float(timeout)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff, self.max_wait, self.sleep = max_retries, float(backoff), float(max_wait), sleep

    @classmethod
    def from_env(cls, **kw) -> "EndpointGenerator":
        """URL, model and key from HARDEDIT_ENDPOINT, HARDEDIT_MODEL, HARDEDIT_API_KEY (the key may be unset)."""
        return cls(os.environ.get("HARDEDIT_ENDPOINT", ""), os.environ.get("HARDEDIT_MODEL", ""),
                   os.environ.get("HARDEDIT_API_KEY"), **kw)

    @property
    def settings(self) -> dict:
        return dict(url=self.url, model=self.model, temperature=self.temperature, max_tokens=self.max_tokens)

    def _post(self, body: dict, seconds: float):
        """The answer to POST `body`, all of it within `seconds` (else TimeoutError). asyncio cancels the
        exchange at the deadline, whatever the server does; it runs in a thread of its own, so that it works
        where an event loop runs already (Jupyter)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

        async def post():
            async with httpx.AsyncClient(timeout=seconds) as client:
                return await asyncio.wait_for(client.post(self.url, json=body, headers=headers), seconds)

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, post()).result()

    def _wait(self, response, attempt: int) -> float:
        """Seconds to wait before retrying: Retry-After (seconds or an HTTP date), else backoff · 2^attempt;
        at most max_wait."""
        after = response.headers.get("Retry-After", "").strip()
        try:
            wait = float(after)
        except ValueError:
            try:
                wait = email.utils.parsedate_to_datetime(after).timestamp() - time.time()
            except (TypeError, ValueError):
                wait = self.backoff * 2 ** attempt
        return min(max(wait, 0.0) if math.isfinite(wait) else self.max_wait, self.max_wait)

    def ask(self, prompt: str, seed: int | None = None) -> Generation:
        import httpx

        settings = self.settings
        body = dict(model=self.model, messages=[{"role": "user", "content": prompt}], temperature=self.temperature,
                    max_tokens=self.max_tokens)
        fail = dict(generator=self.name, prompt=prompt, text=None, settings=settings)
        deadline = time.monotonic() + self.timeout
        retries = 0
        while True:
            try:
                r = self._post(body, deadline - time.monotonic())
            except (TimeoutError, httpx.TimeoutException) as e:
                return Generation(**fail, error=f"timeout after {self.timeout:g} s in all ({type(e).__name__}; "
                                                f"{retries} retries)")
            except httpx.HTTPError as e:
                return Generation(**fail, error=f"http error: {type(e).__name__}: {e}")
            if not (r.status_code == 429 or r.status_code >= 500) or retries == self.max_retries:
                break
            wait = self._wait(r, retries)
            if time.monotonic() + wait >= deadline:
                return Generation(**fail, error=f"http error {r.status_code}: a retry in {wait:g} s would pass the "
                                                f"{self.timeout:g} s timeout ({retries} retries)")
            self.sleep(wait)
            retries += 1
        if r.status_code >= 400:
            return Generation(**fail, error=f"http error {r.status_code} ({retries} retries): {r.text[:200]}")
        try:
            answer = r.json()
            choice = answer["choices"][0]
            return Generation(self.name, prompt, choice["message"]["content"], choice.get("finish_reason"),
                              settings=settings, response=answer)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return Generation(**fail, error=f"http error: not a chat-completions answer ({type(e).__name__}: {e})")
