"""Progress of one analysis: its stage and an ETA, from the tokens each stage will forward
(Stage.work) against the tokens the model has been given so far. On a terminal a tqdm bar;
elsewhere a plain log line when a stage starts and at most every `every` seconds within one,
so a long analysis of a pretrained model is never silent."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from posleak.log import clock, log


class Progress:
    def __init__(self, plan: dict[str, int], every: float = 20.0, bar: bool | None = None):
        self.plan, self.every = plan, every
        self.total = max(1, sum(plan.values()))
        self.done, self.index, self.name = 0, 0, ""
        self.started = self.last_line = time.perf_counter()
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=self.total, unit="tok", unit_scale=True) if use_bar else None

    def stage(self, name: str) -> None:
        self.index += 1
        self.name = name
        if self.bar is not None:
            self.bar.set_description(f"{name} ({self.index}/{len(self.plan)})")
        else:
            self._line()

    def forwarded(self, tokens: int) -> None:
        """Called with the size of every batch the model is given."""
        self.done += tokens
        if self.bar is not None:
            self.bar.update(tokens)
        elif time.perf_counter() - self.last_line >= self.every:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before any work)."""
        if not self.done:
            return None
        elapsed = time.perf_counter() - self.started
        return elapsed / self.done * max(0, self.total - self.done)

    def _line(self) -> None:
        self.last_line = now = time.perf_counter()
        eta = self.eta()
        log.info(
            f"[analyze] {self.name} ({self.index}/{len(self.plan)}) | "
            f"{min(100, 100 * self.done // self.total)}% of forward tokens | "
            f"elapsed {clock(now - self.started)} | eta " + ("?" if eta is None else clock(eta))
        )
