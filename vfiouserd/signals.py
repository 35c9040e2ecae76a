"""Stop and reload signals: held while the daemon sets up (and jails
itself), then delivered to the event loop, for the rest of its life."""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Awaitable, Callable, Iterator

import trio

from vfiouserd.log import get_logger

log = get_logger("signals")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def hold_stop_signals() -> None:
    """Keep SIGTERM/SIGINT/SIGHUP pending until a handler is in place, so a
    signal sent while the daemon starts (or jails itself) is not lost and
    does not kill it half set up."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_received() -> Iterator[trio.MemoryReceiveChannel[int]]:
    """SIGTERM/SIGINT/SIGHUP as a channel, for the rest of the daemon's life.

    Unlike ``trio.open_signal_receiver`` nothing is re-raised when it closes:
    that re-raise is a ``tgkill``, which the jail's filter forbids, and under
    systemd (KillMode=control-group) the jailed daemon gets SIGTERM twice,
    once from systemd and once relayed by its parent. A signal that arrives
    once the run is over is ignored; the handlers are never restored, as the
    daemon is then exiting.
    """
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[int](math.inf)

    def deliver(signum: int) -> None:
        with contextlib.suppress(trio.ClosedResourceError):
            send.send_nowait(signum)

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(deliver, signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    release_stop_signals()  # held since start-up: pending ones arrive now
    try:
        yield receive
    finally:
        send.close()


async def run_until_signalled(
    main: Callable[[], Awaitable[None]],
    on_reload: Callable[[], None] | None = None,
    on_stop: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Run ``main``; SIGTERM or SIGINT cancels it promptly and cleanly (after
    ``on_stop``: a handover), SIGHUP calls ``on_reload``. Further stop
    signals while stopping change nothing."""
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with stop_signals_received() as signals:
                async for signum in signals:
                    log.info("signal", signal=signal.Signals(signum).name)
                    if signum == signal.SIGHUP:
                        if on_reload is not None:
                            on_reload()
                        continue
                    if on_stop is not None:
                        await on_stop()
                    nursery.cancel_scope.cancel()
                    return

        async def run_main() -> None:
            await main()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_signals)
        nursery.start_soon(run_main)
