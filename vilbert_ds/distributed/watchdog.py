"""Heartbeats through the c10d store: a frozen or dead rank is named and the job ends.

`init_distributed` (process_group.py) starts one `PeerWatchdog` per process; `report_step` tells
it the step boundary this rank reached; an uncaught error records `failed/<rank>` in the store
so the peers can name the rank that failed first. Exit status `EXIT_PEER_LOST` (76) when the
watchdog ends a rank because a peer is frozen or dead.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable

from .env import DistEnv

log = logging.getLogger("vilbert_ds.distributed")

EXIT_PEER_LOST = 76  # a peer rank froze or died; the watchdog ended this rank (75 = stopped by a signal)
DEFAULT_WATCHDOG_S = 120.0  # heartbeat silence that ends the job (capped by the collective timeout)
DIAGNOSE_MAX_S = 10.0  # at most this long watching heartbeats to name a dead peer after an error

_watchdog: "PeerWatchdog | None" = None


# ----------------------------------------------------------------------------------------------
# Heartbeats: naming a frozen or dead rank


class PeerWatchdog:
    """Heartbeats through the c10d store, on a daemon thread with its own store connection
    (`store`, whose timeout should be `watchdog_s`: see `_store_client`).

    Every rank sets `hb/<rank>` to "<beat> <step>" each `heartbeat_s`. Rank 0 reads all of them;
    the other ranks read rank 0's and the `abort` key. A rank whose beat has not changed for
    `watchdog_s` (on the watcher's own clock, so node clocks need not agree) is frozen or dead:
    the watcher logs it by rank and host, publishes the reason under `abort` so every rank exits
    with the same message, and ends its own process with `EXIT_PEER_LOST` (the launcher then
    kills what is left, including a stopped process). A store that stops answering means rank 0
    (which hosts it) is frozen. Ranks that exit normally record `exited/<rank>` first, so they
    are not mistaken for dead ones. The training thread only updates `step` (a plain attribute).
    """

    def __init__(
        self,
        env: DistEnv,
        store,
        watchdog_s: float,
        heartbeat_s: float | None = None,
        on_lost: Callable[[str], None] | None = None,
    ):
        if watchdog_s <= 0:
            raise ValueError(f"watchdog_s={watchdog_s} must be positive")
        self.env = env
        self.watchdog_s = float(watchdog_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else max(0.2, min(5.0, self.watchdog_s / 10))
        if self.heartbeat_s >= self.watchdog_s:
            raise ValueError(f"heartbeat_s={self.heartbeat_s} must be shorter than watchdog_s={self.watchdog_s}")
        self.step: int = -1  # last step boundary the training loop reached (set by StopSignal)
        self._store = store
        self._on_lost = on_lost or _exit_peer_lost
        self._stop = threading.Event()
        self._lost_once = threading.Event()
        self._beat = 0
        self._hosts: dict[int, str] = {}
        self._alive = time.monotonic()  # when the watchdog loop last completed its store calls
        self._thread = threading.Thread(target=self._run, name="vilbert-ds-watchdog", daemon=True)
        self._guard = threading.Thread(target=self._guard_run, name="vilbert-ds-watchdog-guard", daemon=True)

    def start(self) -> "PeerWatchdog":
        # Host names now, while the store answers for sure (every rank joined moments ago).
        keys = [f"joined/{r}" for r in range(self.env.world_size)]
        self._hosts = {r: "host " + h.decode() for r, h in enumerate(self._store.multi_get(keys))}
        self._beat_once()
        self._alive = time.monotonic()
        self._thread.start()
        self._guard.start()
        return self

    def stop(self, exited: bool = True) -> None:
        """Stop beating; with `exited`, tell the others this rank left on purpose."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.heartbeat_s + 5)
        if exited:
            # bounded: at exit the store host may be frozen or gone
            _bounded(lambda: self._store.set(f"exited/{self.env.rank}", "1"), self.heartbeat_s + 5)

    def _beat_once(self) -> None:
        self._beat += 1
        self._store.set(f"hb/{self.env.rank}", f"{self._beat} {self.step}")

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # noqa: BLE001 - a watchdog bug must not end a healthy job
            log.exception("watchdog on rank %d failed; this rank is no longer watched", self.env.rank)
            self._stop.set()
            _bounded(lambda: self._store.set(f"exited/{self.env.rank}", "watchdog failed"), self.heartbeat_s + 5)

    def _watch(self) -> None:
        watched = list(range(self.env.world_size)) if self.env.rank == 0 else [0]
        watched = [r for r in watched if r != self.env.rank]
        last: dict[int, str] = {}
        changed: dict[int, float] = {r: time.monotonic() for r in watched}
        while not self._stop.wait(self.heartbeat_s):
            started = time.monotonic()
            try:
                self._beat_once()
                # `get` and `wait` honour the store timeout; `check` would block forever on a
                # frozen store host (the guard thread covers every call anyway).
                abort = self._store.multi_get(["abort"]) if self._store.check(["abort"]) else None
                beats = self._store.multi_get([f"hb/{r}" for r in watched]) if watched else []
            except Exception as e:  # noqa: BLE001 - classify: frozen store host, or gone
                if self._stop.is_set():
                    return
                if time.monotonic() - started >= 0.9 * self.watchdog_s:
                    self._lost(self._frozen_store_reason(), publish=False)
                else:
                    # Rank 0 exited (normally or not): if it failed, the launcher and the failing
                    # collectives report it; nothing left to watch.
                    log.info("watchdog on rank %d stops: store unreachable (%s)", self.env.rank, first_line(e))
                    self._stop.set()
                return
            self._alive = now = time.monotonic()
            if abort:
                self._lost(abort[0].decode(), publish=False)
                return
            for r, raw in zip(watched, beats):
                text = raw.decode()
                if text != last.get(r):
                    last[r], changed[r] = text, now
                elif now - changed[r] > self.watchdog_s and not self._exited(r):
                    peer_step = (text.split() + ["?", "?"])[1]
                    self._lost(
                        f"rank {r} ({self._host(r)}) sent no heartbeat for {now - changed[r]:.0f}s "
                        f"(watchdog_s={self.watchdog_s:g}): it is frozen (e.g. SIGSTOP) or dead; "
                        f"its last heartbeat was at step {peer_step}, rank {self.env.rank} is at step {self.step}",
                        publish=True,
                    )
                    return

    def _guard_run(self) -> None:
        """A store call that never returns (TCPStore's `check`/`set` wait without a timeout)
        means the store's host, rank 0, is frozen: end the job from here."""
        limit = self.watchdog_s + 2 * self.heartbeat_s
        while not self._stop.wait(self.heartbeat_s):
            if time.monotonic() - self._alive > limit:
                self._lost(self._frozen_store_reason(), publish=False)
                return

    def _frozen_store_reason(self) -> str:
        return (
            f"rank 0 ({self._host(0)}) is frozen (e.g. SIGSTOP) or its node hangs: the store it hosts at "
            f"{self.env.master_addr}:{self.env.master_port} did not answer for {self.watchdog_s:g}s"
        )

    def _exited(self, rank: int) -> bool:
        return bool(self._store.check([f"exited/{rank}"]))

    def _host(self, rank: int) -> str:
        return self._hosts.get(rank, "host unknown")

    def _lost(self, reason: str, publish: bool) -> None:
        if self._lost_once.is_set():
            return
        self._lost_once.set()
        if publish:
            try:
                self._store.set("abort", reason)
                # Rank 0 hosts the store: stay up long enough for every rank to read the reason.
                time.sleep(2 * self.heartbeat_s)
            except Exception:  # noqa: BLE001 - still end this rank below
                pass
        self._on_lost(f"{self.env.describe()}: ending the job: {reason}")

    def diagnose(self, window_s: float | None = None) -> str:
        """One line about the peers for an error message, after watching their heartbeats for
        `window_s` (default 2.5 heartbeats): ranks that recorded a failure, ranks that stopped
        beating (killed or frozen), ranks that exited, and the step each one reached."""
        window_s = 2.5 * self.heartbeat_s if window_s is None else window_s
        others = [r for r in range(self.env.world_size) if r != self.env.rank]
        keys = [f"hb/{r}" for r in others]
        try:
            before = [b.decode() for b in self._store.multi_get(keys)] if keys else []
            time.sleep(window_s)
            after = [b.decode() for b in self._store.multi_get(keys)] if keys else []
            failed = {r: self._store.get(f"failed/{r}").decode() for r in others if self._store.check([f"failed/{r}"])}
            exited = [r for r in others if r not in failed and self._exited(r)]
        except Exception as e:  # noqa: BLE001 - the store lives in rank 0's process
            return f"rank 0 ({self._host(0)}) is gone: its store at {self.env.master_addr}:{self.env.master_port} is unreachable ({first_line(e)})"
        parts = [f"rank {r} ({self._host(r)}) failed: {why}" for r, why in failed.items()]
        silent = [r for r, b, a in zip(others, before, after) if a == b and r not in failed and r not in exited]
        if silent:
            parts.append(
                f"rank(s) {ranks_text(silent)} sent no heartbeat for {window_s:.1f}s (killed or frozen; "
                + ", ".join(f"rank {r} on {self._host(r)}" for r in silent[:4])
                + ")"
            )
        if exited:
            parts.append(f"rank(s) {ranks_text(exited)} exited")
        steps = {r: (a.split() + ["?", "?"])[1] for r, a in zip(others, after)}
        parts.append("last steps: " + ", ".join(f"rank {r}={steps[r]}" for r in others[:16]) + f", this rank={self.step}")
        return "; ".join(parts)


def _exit_peer_lost(message: str) -> None:
    _say(message)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)  # from a thread: the main thread may be blocked inside a collective


def _say(message: str) -> None:
    """An error line that reaches the job log whether or not logging is configured."""
    if logging.getLogger().handlers:
        log.error(message)
    else:
        print(f"[vilbert-ds] ERROR {message}", file=sys.stderr, flush=True)


def _bounded(fn: Callable[[], object], timeout_s: float) -> tuple[bool, object]:
    """Run `fn` on a daemon thread for at most `timeout_s`: (True, result), (False, exception)
    or (False, None) when it did not return in time (it is left blocked on its thread)."""
    out: list = []

    def call() -> None:
        try:
            out.append((True, fn()))
        except Exception as e:  # noqa: BLE001 - handed back to the caller
            out.append((False, e))

    t = threading.Thread(target=call, name="vilbert-ds-bounded", daemon=True)
    t.start()
    t.join(timeout_s)
    return out[0] if out else (False, None)


def start_watchdog(env: DistEnv, store, watchdog_s: float, heartbeat_s: float | None = None) -> PeerWatchdog:
    """Start the process's watchdog (init_distributed does this) and hook exit and errors."""
    global _watchdog
    stop_watchdog()
    _watchdog = PeerWatchdog(env, store, watchdog_s, heartbeat_s).start()
    atexit.register(stop_watchdog)
    _install_excepthook(env)
    return _watchdog


def stop_watchdog() -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop(exited=True)
        _watchdog = None


def current_watchdog() -> PeerWatchdog | None:
    return _watchdog


def report_step(step: int) -> None:
    """Tell the watchdog the step boundary this rank reached (shown when a peer is lost)."""
    if _watchdog is not None:
        _watchdog.step = int(step)


def _install_excepthook(env: DistEnv) -> None:
    """An uncaught error records `failed/<rank>` in the store (so peers can name the rank that
    failed first) and prints what the peers recorded, then the usual traceback."""
    previous = sys.excepthook
    if getattr(previous, "_vilbert_ds", False):
        return

    def hook(exc_type, exc, tb):
        wd = _watchdog
        if wd is not None:
            cause = f"{exc_type.__name__}: {first_line(exc)}"
            window_s = min(2.5 * wd.heartbeat_s, DIAGNOSE_MAX_S)
            _say(f"{env.describe()} failed: {cause}; watching the peers' heartbeats for {window_s:.1f}s")

            def record_and_diagnose() -> str:
                wd._store.set(f"failed/{env.rank}", cause)
                # silent ranks over a few beats are the killed or frozen ones
                return wd.diagnose(window_s)

            # The launcher SIGTERMs the survivors as soon as one rank dies; the few seconds spent
            # naming that rank are worth delaying it (torchrun and SLURM wait 30 s by default
            # before SIGKILL). Bounded: with rank 0 frozen, store calls never return.
            handler = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                ok, peers = _bounded(record_and_diagnose, window_s + 5)
            finally:
                signal.signal(signal.SIGTERM, handler)
            if not ok:
                peers = wd._frozen_store_reason() if peers is None else f"unknown ({first_line(peers)})"
            _say(f"{env.describe()}: peers: {peers}")
            wd.stop(exited=False)
        previous(exc_type, exc, tb)

    hook._vilbert_ds = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def ranks_text(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:16])) + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")
