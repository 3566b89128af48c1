"""How fast one aiohttp process can answer at all, beside our script route: the floor under issue 20's script target.

    .venv/bin/python benchmarks/aiohttp_floor.py [ROUNDS]    # default 3; prints a markdown table

Three servers, each one process on the server CPU, wrk at 50 connections on the others (pinned as benchmarks/run
pins): a bare aiohttp handler answering 5 bytes; a handler rendering a jinja2 template as large as our script (our
own script's text, a few values substituted) and nothing else; and ours (`bootserver serve`, the script route: the
machine's row, its group, a signed token, the template, the event written behind). Medians over rounds.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import urllib.request
from pathlib import Path

from common import Ours, free_port, med, pin_clients, server_command, spread, stop, table, wait_http, wrk

MAC_PATH = "52-54-00-00-00-01"
SITE = """[server]
http = "127.0.0.1:{port}"
tftp = "off"
data_dir = "{data}"
[assets]
vmlinuz = "images/vmlinuz"
initrd = "images/initrd"
[profiles.linux]
kernel = "vmlinuz"
initrd = ["initrd"]
cmdline = "console=ttyS0 quiet"
[groups.all]
profile = "linux"
"""

# The floor servers: the same aiohttp, plain asyncio loop, no access log; TEMPLATE is our script's text.
FLOOR = textwrap.dedent("""
    import sys
    import jinja2
    from aiohttp import web

    template = jinja2.Environment().from_string(open(sys.argv[2]).read())

    async def bare(request):
        return web.Response(text="hello")

    async def render(request):
        return web.Response(text=template.render(mac=request.match_info["mac"], host="node1", token="x" * 120))

    app = web.Application()
    app.router.add_get("/bare", bare)
    app.router.add_get("/boot/{mac}.ipxe", render)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
""")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    pin_clients()
    scratch = Path(tempfile.mkdtemp(prefix="aiohttp-floor-"))
    data = scratch / "data"
    (data / "images").mkdir(parents=True)
    for name in ("vmlinuz", "initrd"):
        (data / "images" / name).write_bytes(b"\0" * 4096)
    port, floor_port = free_port(), free_port()
    (scratch / "floor.py").write_text(FLOOR)
    with Ours(scratch, SITE.format(port=port, data=data), port) as ours:
        with urllib.request.urlopen(f"{ours.url}/boot/{MAC_PATH}.ipxe") as response:
            script = response.read().decode()
        (scratch / "script.j2").write_text(script.replace("52:54:00:00:00:01", "{{ mac }}"))
        floor = subprocess.Popen(server_command([sys.executable, str(scratch / "floor.py"), str(floor_port),
                                                 str(scratch / "script.j2")]))
        try:
            wait_http(f"http://127.0.0.1:{floor_port}/bare", 15, floor)
            urls = {"aiohttp, bare handler (5 bytes)": f"http://127.0.0.1:{floor_port}/bare",
                    f"aiohttp, one template render ({len(script)} bytes)":
                        f"http://127.0.0.1:{floor_port}/boot/{MAC_PATH}.ipxe",
                    "ours, the script route": f"{ours.url}/boot/{MAC_PATH}.ipxe"}
            runs: dict[str, list] = {name: [] for name in urls}
            for _ in range(rounds):
                for name, url in urls.items():
                    runs[name].append(wrk(url, 50, 8, threads=2))
        finally:
            stop(floor)
    rows = [[name, spread([r.rps for r in results], "{:,.0f}"), spread([r.p99_ms for r in results], "{:.2f}"),
             sum(r.errors for r in results)] for name, results in runs.items()]
    print(f"wrk, 50 connections, 8 s per run, {rounds} rounds; median (min-max)\n")
    print(table(["server", "req/s", "p99 ms", "errors"], rows))
    ours_rps = med([r.rps for r in runs["ours, the script route"]])
    print(f"\nours / one template render: {ours_rps / med([r.rps for r in list(runs.values())[1]]):.2f}x")


if __name__ == "__main__":
    main()
