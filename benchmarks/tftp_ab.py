"""TFTP, one case up close: ours and dnsmasq alternating on 64 curl clients x 2 files of 1 MiB (blksize 1468),
with the kernel's UDP counters around every run: datagrams in, and receive/send buffer errors (a lost datagram
costs a retransmission timeout, which would show as a stall).

    sudo .venv/bin/python benchmarks/tftp_ab.py [ROUNDS]    # default 4; prints a markdown table

Same servers, namespace and pinning as bench_tftp.py (it re-runs itself under `unshare --net`).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import bench_tftp as b
from common import pin_clients

COUNTERS = ("InDatagrams", "InErrors", "RcvbufErrors", "SndbufErrors")


def udp_counters() -> dict[str, int]:
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    b.in_namespace()
    pin_clients()
    servers, ours = b.start_servers(Path(tempfile.mkdtemp(prefix="tftp-ab-")))
    print(f"64 curl x 2 x 1 MiB, blksize 1468; ours: tftp_engine = \"{b.ENGINE}\"\n")
    print("| round | server | MB/s | seconds | failures | server CPU-s | " + " | ".join(COUNTERS) + " |")
    print("| --- " * (6 + len(COUNTERS)) + "|")
    try:
        for number in range(1, rounds + 1):
            for name in (b.OURS, b.DNSMASQ):
                before, cpu = udp_counters(), servers[name].cpu()
                fetch = b.curl_clients(servers[name].port, b.FILES["1 MiB"][0], 64, 2, 1468)
                cpu, after = servers[name].cpu() - cpu, udp_counters()
                counts = " | ".join(str(after[c] - before[c]) for c in COUNTERS)
                print(f"| {number} | {name} | {fetch.bytes / 1e6 / fetch.seconds:.1f} | {fetch.seconds:.2f} | "
                      f"{fetch.failures} | {cpu:.2f} | {counts} |", flush=True)
    finally:
        ours.stop()
        for server in servers.values():
            if server.name != b.OURS:
                server.process.terminate()


if __name__ == "__main__":
    main()
