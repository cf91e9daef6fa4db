"""Reading a running process's operations listener (``[metrics] listen``), for tests.

:func:`metrics_url` finds the listener's URL in the process's log (a config may ask for
port 0); :func:`scrape` reads ``/metrics`` into a :class:`Samples`.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_LISTENING = re.compile(r"metrics listening on (http://[0-9.]+:\d+)")


def metrics_url(log: Callable[[], str], timeout: float = 10.0) -> str:
    """The operations listener's base URL, from its log line (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _LISTENING.search(log())
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise RuntimeError(f"no metrics listener in the log:\n{log()}")


@dataclass(frozen=True)
class Samples:
    """The samples of one scrape: ``(name, labels) -> value``."""

    values: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    def get(self, name: str, **labels: str) -> float | None:
        """The sample ``name`` whose labels include ``labels`` (None: none)."""
        for (sample, have), value in self.values.items():
            if sample == name and set(labels.items()) <= have:
                return value
        return None

    def names(self) -> set[str]:
        return {name for name, _ in self.values}


@dataclass(frozen=True)
class Response:
    """An answer of the operations listener."""

    status: int
    text: str
    content_type: str


#: No proxy from the environment: the listener is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, *, method: str = "GET", timeout: float = 10.0) -> Response:
    """One request (an error status is returned, not raised)."""
    request = urllib.request.Request(url, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            body, status, headers = answer.read(), answer.status, answer.headers
    except urllib.error.HTTPError as exc:
        body, status, headers = exc.read(), exc.code, exc.headers
    return Response(status, body.decode(), headers.get("content-type", ""))


def scrape(base_url: str) -> Samples:
    """GET ``/metrics`` and parse it (the text format Prometheus reads)."""
    response = get(f"{base_url}/metrics")
    if response.status != 200:
        raise RuntimeError(f"{base_url}/metrics answered {response.status}: {response.text}")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Samples(values)
