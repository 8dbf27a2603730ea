"""Fires expiration timers. Deadlines live in Redis, so any allocator process fires any timer,
also those set by a process that died. Several processes sweeping at once is harmless: each
expiry is one atomic script that releases an address only while its timer uuid still matches."""

from __future__ import annotations

import asyncio
import logging
import time

from .service import AllocatorService

log = logging.getLogger(__name__)


class TimerSweeper:
    def __init__(self, service: AllocatorService, *, interval_s: float, full_scan_s: float) -> None:
        self.service = service
        self.store = service.store
        self.interval_s = interval_s
        self.full_scan_s = full_scan_s

    async def sweep_once(self) -> int:
        """Expires every due timer; returns how many addresses were released."""
        released = 0
        for node, pool in await self.store.due_timers(int(time.time() * 1000)):
            try:
                outcome = await self.store.expire_due(node, pool)
            except Exception as exc:  # noqa: BLE001 - node deleted meanwhile, or Redis away
                log.debug("expiring %s/%s failed: %s", node, pool, exc)
                await self.store.reindex_timer(node, pool, 0)
                continue
            await self.store.reindex_timer(node, pool, outcome.next_ms)
            if outcome.ips:
                released += len(outcome.ips)
                if self.service.metrics is not None:
                    self.service.metrics.expired.inc(len(outcome.ips))
                log.info("expired %d address(es) of %s/%s", len(outcome.ips), node, pool)
                await self.service.publish_if_needed(node, pool, outcome.state)
        return released

    async def reindex_all(self) -> None:
        """Rebuilds the timer index from every pool (repairs an index write lost in a crash)."""
        for node in await self.store.node_names():
            for pool in await self.store.pool_names(node):
                deadline = await self.store.next_timer_deadline(node, pool)
                if deadline:
                    await self.store.reindex_timer(node, pool, deadline)

    async def run(self) -> None:
        last_scan = 0.0
        while True:
            try:
                if time.monotonic() - last_scan >= self.full_scan_s:
                    await self.reindex_all()
                    last_scan = time.monotonic()
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep sweeping once Redis is back
                log.warning("timer sweep failed: %s", exc)
            await asyncio.sleep(self.interval_s)
