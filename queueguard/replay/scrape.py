"""Record a running guard's /metrics over time, the way Prometheus would scrape it.

A `Recorder` scrapes every `interval` seconds in a thread and keeps, per
scrape, the samples of the metric names asked for. A failed scrape is kept as
a gap (the alert rules then see a missing sample, as Prometheus would).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
"""(metric name, sorted label pairs)."""


def parse_samples(text: str, names: Iterable[str] | None = None) -> dict[SeriesKey, float]:
    """Samples of a Prometheus text exposition; only `names` when given (full sample names,
    e.g. `queueguard_queue_departed_total`)."""
    wanted = set(names) if names is not None else None
    out: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if wanted is None or s.name in wanted:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


@dataclass
class Scrape:
    at: float
    samples: dict[SeriesKey, float] | None
    """None when the scrape failed."""


@dataclass
class Recorder:
    """Scrape `url` every `interval` seconds until stop(); `scrapes` in order."""

    url: str
    names: set[str]
    interval: float = 0.5
    scrapes: list[Scrape] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def scrape_once(self) -> Scrape:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                text = r.read().decode()
            scrape = Scrape(time.time(), parse_samples(text, self.names))
        except OSError:
            scrape = Scrape(time.time(), None)
        self.scrapes.append(scrape)
        return scrape

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.scrape_once()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> Recorder:
        self._thread = threading.Thread(target=self._run, name="replay-scrape", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def mark(self) -> int:
        """Index of the next scrape: remember when a fault was injected."""
        return len(self.scrapes)

    def values(self, name: str, **labels: str) -> list[float | None]:
        """Per scrape, the sum of `name`'s samples whose labels include `labels` (None: no sample)."""
        out: list[float | None] = []
        for s in self.scrapes:
            if s.samples is None:
                out.append(None)
                continue
            got = [v for (n, lbl), v in s.samples.items()
                   if n == name and all(dict(lbl).get(k) == val for k, val in labels.items())]
            out.append(sum(got) if got else None)
        return out
