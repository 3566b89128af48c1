"""An open-loop HTTP load driver: requests at a constant arrival rate, latency from each one's intended send time.

wrk (closed loop) sends a connection's next request only when the previous answer is in: when the server
stalls, wrk stalls with it and the requests that would have arrived meanwhile are never sent nor timed
(coordinated omission), so its tails read low. Debian has no wrk2, hence this: request i is due at
t0 + i / rate, on connection i mod C (HTTP/1.1 keep-alive, as wrk2 does it). A connection still waiting for
its previous answer sends the next request as soon as it can, and that request's latency still runs from
when it was due. So a server that falls behind shows it in the tail instead of slowing the load down.

    python benchmarks/openloop.py URL --rate 500 --seconds 8 [--connections 50]

prints one JSON line: scheduled, completed, errors, latency percentiles (from the due time), the service
time (from the actual send: what a closed-loop tool would see) and the send delay (actual send - due: asyncio's
timers are ~1 ms coarse, or the connection still awaited its previous answer; counted in the latency, never
subtracted). Bounded: it sends
nothing after `seconds` and waits at most `--drain` seconds more for answers; what has not come by then is
counted as an error and as an infinite latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import urllib.parse


async def connection(host: str, port: int, request: bytes, due: list[float], done: list[float],
                     sent: list[float], errors: list[str], deadline: float) -> None:
    """Send this connection's requests at their due times (later if still busy); `done[k]`/`sent[k]` per k."""
    reader = writer = None
    for k, when in enumerate(due):
        wait = when - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if time.monotonic() > deadline:
            break
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            sent[k] = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            if head[9:12] != b"200":
                errors.append(f"HTTP {head[9:12].decode(errors='replace')}")
                continue
            done[k] = time.monotonic()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if writer is not None:
                writer.close()
            reader = writer = None  # a new connection for the next request
    if writer is not None:
        writer.close()


def percentile(values: list[float], p: float) -> float:
    """Nearest rank, as common.percentile (this file runs on its own, without common's imports)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5))) - 1]


async def drive(url: str, rate: float, seconds: float, connections: int, drain: float) -> dict:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: openloop\r\n\r\n".encode()
    total = int(rate * seconds)
    t0 = time.monotonic() + 0.1  # every connection's coroutine is running before the first request is due
    due = [t0 + i / rate for i in range(total)]
    per_conn = [due[c::connections] for c in range(connections)]
    done = [[math.nan] * len(d) for d in per_conn]
    sent = [[math.nan] * len(d) for d in per_conn]
    errors: list[str] = []
    deadline = t0 + seconds + drain
    tasks = [asyncio.create_task(connection(host, port, request, per_conn[c], done[c], sent[c], errors, deadline))
             for c in range(connections)]
    await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()) + 1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    latency, service, lag = [], [], []
    for c in range(connections):
        for when, s, d in zip(per_conn[c], sent[c], done[c], strict=True):
            latency.append(d - when if not math.isnan(d) else math.inf)  # never answered: infinitely late
            if not math.isnan(d):
                service.append(d - s)
                lag.append(s - when)
    completed = len(service)
    last = max((d for row in done for d in row if not math.isnan(d)), default=t0)
    ms = 1000
    return {"rate": rate, "seconds": seconds, "connections": connections, "scheduled": total,
            "completed": completed, "errors": total - completed, "first_error": errors[0] if errors else "",
            "achieved_rps": completed / max(last - t0, 1e-9),
            "p50_ms": percentile(latency, 50) * ms, "p99_ms": percentile(latency, 99) * ms,
            "p999_ms": percentile(latency, 99.9) * ms, "max_ms": max(latency, default=math.nan) * ms,
            "service_p50_ms": percentile(service, 50) * ms, "service_p99_ms": percentile(service, 99) * ms,
            "lag_p99_ms": percentile(lag, 99) * ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True, help="how long requests are sent")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait for the last answers")
    args = parser.parse_args()
    result = asyncio.run(drive(args.url, args.rate, args.seconds, args.connections, args.drain))
    # JSON has no infinity: a latency that never ended (an unanswered request in the percentile) is null
    print("OPENLOOP " + json.dumps({k: None if v == math.inf else v for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()
