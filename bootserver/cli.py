"""The `bootserver` command: serve, explain what a machine would get, list machines, build images."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
import time
from ipaddress import IPv4Interface
from pathlib import Path

from . import __version__
from . import config as configuration
from .booter import Booter, Netboot, Urls
from .errors import BootserverError, NotFound
from .fleet import STUCK_FACTOR
from .mac import canonical_mac
from .opening import open_core, open_store
from .phases import LABELS, Boot, latest
from .power import POWER_ACTIONS
from .provision.disk import TARGET_ROOT, dry_run
from .provision.pki import encrypt_secret
from .store import Store
from .tools.lab import ADDRESS as LAB_ADDRESS
from .tools.lab import FIRMWARES, Lab
from .web.views import clock, duration, machine_view, size, summarize


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.command(args)
    except BootserverError as exc:
        print(f"bootserver: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bootserver", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (default: embedded defaults)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP and TFTP servers")
    serve.set_defaults(command=cmd_serve)

    render = commands.add_parser("render", help="print the iPXE script a machine would get, and why")
    render.add_argument("mac")
    render.add_argument("--platform", default="", help="as iPXE reports it: pcbios or efi")
    render.add_argument("--arch", default="", help="as iPXE reports it: i386, x86_64, arm64")
    render.add_argument("--url", default="", help="base URL to render with (default: from the config)")
    render.add_argument("--file", metavar="NAME", help="print this installer file of its profile instead "
                        "([profiles.X.files]), as the machine would get it")
    render.set_defaults(command=cmd_render)

    nodes = commands.add_parser("nodes", help="list the machines this server has seen")
    nodes.add_argument("--stuck", action="store_true", help="only machines in a phase of their boot for longer than "
                                                            "that phase's p90 across the fleet x 3")
    nodes.set_defaults(command=cmd_nodes)

    show = commands.add_parser("show", help="a machine's timeline, its latest boot's waterfall, what it boots and "
                                            "why, its pinned host key")
    show.add_argument("mac")
    show.add_argument("--limit", type=int, default=200, help="show this many of the newest events (default 200)")
    show.set_defaults(command=cmd_show)

    plan = commands.add_parser("plan", help="print what provisioning a machine would do (disk commands, files)")
    plan.add_argument("mac")
    plan.add_argument("--dry-run", action="store_true", default=True, help="the only mode: nothing is run")
    plan.add_argument("--wipe", action="store_true", help="plan as if the machine were marked for re-provisioning")
    plan.set_defaults(command=cmd_plan)

    reprovision = commands.add_parser("reprovision", help="send a machine through the whole flow on its next boot")
    reprovision.add_argument("mac")
    reprovision.add_argument("--now", action="store_true",
                             help="and boot it now through its BMC: next boot from the network, power cycle")
    reprovision.set_defaults(command=cmd_reprovision)

    deploy = commands.add_parser("deploy", help="send machines (MACs, or groups' configured members) through the "
                                                "whole flow")
    deploy.add_argument("targets", nargs="+", metavar="GROUP|MAC")
    deploy.add_argument("--now", action="store_true", help="and boot each now through its BMC")
    deploy.add_argument("--parallel", type=int, metavar="N",
                        help="at most N BMC calls at once (default: [server] bmc_concurrency)")
    deploy.set_defaults(command=cmd_deploy)

    power = commands.add_parser("power", help="a machine's power through its BMC ([machines.\"MAC\".bmc])")
    power.add_argument("mac")
    power.add_argument("action", choices=["status", *POWER_ACTIONS])
    power.set_defaults(command=cmd_power)

    bmc = commands.add_parser("bmc", help="BMC passwords for the config")
    bmc_commands = bmc.add_subparsers(required=True, metavar="ACTION")
    encrypt = bmc_commands.add_parser(
        "encrypt-password", help="print a BMC password encrypted for [machines.\"MAC\".bmc] password",
        description="Read a BMC password from standard input (or a prompt) and print it encrypted with [server] "
                    "secret_key_file (made if missing), as [machines.\"MAC\".bmc] password takes it.")
    encrypt.set_defaults(command=cmd_bmc_encrypt)

    approve = commands.add_parser("approve", help="open a machine's provisioning window ([server] enroll)")
    approve.add_argument("mac")
    approve.set_defaults(command=cmd_approve)

    image = commands.add_parser("image", help="build the agent netboot image, or an OS image to install")
    image_commands = image.add_subparsers(required=True, metavar="ACTION")
    build = image_commands.add_parser("build", help="kernel + initramfs from Debian packages")
    build.add_argument("--out", type=Path, help="output directory (default: DATA_DIR/images/agent)")
    build.set_defaults(command=cmd_image_build)
    os_image = image_commands.add_parser("os", help="an installable OS root filesystem tarball (mmdebstrap)")
    os_image.add_argument("distribution", choices=["debian"])
    os_image.add_argument("--suite", default="bookworm", help="Debian suite (default bookworm)")
    os_image.add_argument("--mirror", help="Debian mirror URL (default: the host's apt sources' mirror)")
    os_image.add_argument("--security-mirror", metavar="URL|none",
                          help="security mirror (default: the host's, if its apt sources have one)")
    os_image.add_argument("--out", type=Path, help="output directory (default: DATA_DIR/images/os)")
    os_image.set_defaults(command=cmd_image_os)
    secure = image_commands.add_parser("secureboot", help="the signed shim and GRUB for Secure Boot machines")
    secure.add_argument("--out", type=Path, help="output directory (default: [server] secure_boot_dir, else "
                                                 "DATA_DIR/secureboot)")
    secure.add_argument("--suite", default="trixie",
                        help="the Debian release whose signed shim and GRUB are taken (default trixie: bookworm's "
                             "network GRUB cannot boot over the firmware's HTTP boot)")
    secure.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror URL")
    secure.set_defaults(command=cmd_image_secureboot)

    db = commands.add_parser("db", help="the store's schema, and moving from SQLite to PostgreSQL")
    db_commands = db.add_subparsers(required=True, metavar="ACTION")
    migrate = db_commands.add_parser(
        "migrate", help="bring the store's schema to this version (serve does it too)",
        description="Bring the store's schema to this bootserver's version and print the version before and after. "
                    "`serve` does the same at start; run it alone to upgrade a shared database before starting "
                    "replicas of a new version. Replicas migrating at once migrate once (a lock in the database).")
    migrate.add_argument("--database", metavar="URL_OR_FILE",
                         help="postgresql://user:password@host/dbname or an SQLite file (default: the config's "
                              "[server] database, else data_dir/bootserver.sqlite3)")
    migrate.set_defaults(command=cmd_db_migrate)
    copy = db_commands.add_parser(
        "copy", help="copy an SQLite store into an empty PostgreSQL database",
        description="Copy a single server's SQLite store into an empty PostgreSQL database (its schema made first): "
                    "machines, their timelines with the same event ids, tokens, DHCP leases, jobs and shared "
                    "secrets, in one transaction. A database that holds machines already is refused. Stop the "
                    "server first, so that nothing is recorded meanwhile; afterwards, put its data_dir/keys in the "
                    "first replica's data_dir (that replica moves the keys into the database when it starts) and "
                    "set [server] database in every replica's config.")
    copy.add_argument("--from", dest="source", metavar="FILE", type=Path, required=True,
                      help="the SQLite store: data_dir/bootserver.sqlite3")
    copy.add_argument("--to", dest="target", metavar="URL", required=True,
                      help="the PostgreSQL database: postgresql://user:password@host/dbname")
    copy.set_defaults(command=cmd_db_copy)

    lab = commands.add_parser("lab", help="QEMU VMs on a VDE switch netbooting from bootserver (root; vde2, QEMU)")
    lab.add_argument("--dir", type=Path, help="where the lab keeps its state, logs and disks (default: DATA_DIR/lab)")
    lab_commands = lab.add_subparsers(required=True, metavar="ACTION")
    up = lab_commands.add_parser("up", help="namespace, switch, bootserver as full DHCP server, N VMs")
    up.add_argument("--vms", type=int, default=2, help="how many VMs (default 2)")
    up.add_argument("--firmware", choices=FIRMWARES, default="bios")
    up.add_argument("--bmc", choices=["ipmi", "redfish"], default="ipmi",
                    help="the VMs' BMCs: an ipmi_sim each (default), or libvirt domains behind one sushy-tools "
                         "Redfish emulator (libvirt-daemon, libvirt-daemon-driver-qemu, sushy-tools, libvirt-python)")
    up.add_argument("--timeout", type=float, default=1200, help="seconds to wait for every VM to be running")
    up.add_argument("--address", default=str(LAB_ADDRESS), help=f"our address on the lab's switch ({LAB_ADDRESS})")
    up.add_argument("--image-dir", type=Path, help="the agent image (default: DATA_DIR/images/agent)")
    up.set_defaults(command=cmd_lab_up)
    status = lab_commands.add_parser("status", help="processes, machine states, the peer matrix")
    status.add_argument("--json", action="store_true", help="as JSON: {\"machines\": [{mac, hostname, ip, state, "
                                                             "facts, power, bmc, peers}], ...}")
    status.set_defaults(command=cmd_lab_status)
    lab_commands.add_parser("down", help="stop everything the lab started").set_defaults(command=cmd_lab_down)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import init_app, serve  # aiohttp is only needed when serving

    # Files we make (the SQLite store and its WAL, keys, data_dir/api_token) are ours alone: 0600, 0700.
    os.umask(0o077)
    config = configuration.load(args.config)
    asyncio.run(serve(init_app(config)))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    mac = canonical_mac(args.mac)
    facts = {k: v for k, v in (("platform", args.platform), ("arch", args.arch)) if v}
    base = args.url or f"http://{config.server.public_address or 'SERVER'}:{config.server.http.port}"
    booter = open_core(config)
    spec = booter.boot_spec(mac, facts)
    machine = f"configured as {spec.machine.hostname or 'no hostname'}" if spec.machine else "not in [machines]"
    print(f"# {mac}: {machine}; facts {facts or 'none given'}")
    print(f"# matched: {spec.reason}")
    if spec.profile is None:
        print("# no profile: the machine gets the no-boot script and falls through to its next boot device")
        return 1
    if args.file:
        print(f"# profile: {spec.profile.name}, file {args.file}")
        print(booter.render_installer_file(spec, args.file, Urls(files=base, api=base)), end="")
        return 0
    print(f"# profile: {spec.profile.name} (template {spec.profile.template})")
    print(booter.render_profile(spec, Urls(files=base, api=base)), end="")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    store = open_store(config)
    seen, where, _ = store.node_count(), store.location, store.close()  # location: a URL's password masked
    if not seen:
        print(f"no machines yet (store: {where})")
        return 0
    booter = open_core(config)  # after the check: it makes the server's keys, which `nodes` alone should not
    if args.stuck:
        return _print_stuck(booter)
    views = [machine_view(booter, n) for n in booter.history().nodes()]
    rows = [(v.node.mac, v.hostname or "-", v.node.state, v.profile or "-", v.node.facts.get("platform", "-"),
             _ago(v.node.last_seen)) for v in views]
    _print_table(("MAC", "HOSTNAME", "STATE", "PROFILE", "PLATFORM", "LAST SEEN"), rows)
    return 0


def _print_stuck(booter: Booter) -> int:
    """Machines stuck in a phase (fleet.py), the most overdue first; 1 when there is one (for scripts)."""
    fleet = booter.fleet()
    fleet.refresh(limit=None)
    stuck = fleet.stuck(time.time())
    if not stuck:
        print(f"no machine is stuck: none is in a phase for longer than its p90 across the fleet x {STUCK_FACTOR}")
        return 0
    rows = [(s.mac, booter.hostname(s.mac), LABELS[s.phase], duration(s.seconds), duration(s.limit)) for s in stuck]
    _print_table(("MAC", "HOSTNAME", "PHASE", "IN IT FOR", f"P90 x {STUCK_FACTOR}"), rows)
    return 1


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def waterfall_text(boot: Boot, now: float, width: int = 40) -> list[str]:
    """A boot's phases as lines of text: name, a bar on the boot's time scale, duration, bytes and rate."""
    span = max(boot.seconds(now), 1e-9)
    outcome = boot.outcome or "under way"
    lines = [f"boot of {clock(boot.start)}: {outcome}, {duration(boot.seconds(now))}"
             f"{'' if boot.over else ' so far'}"]
    label_width = max(len(p.label) for p in boot.phases)
    for phase in boot.phases:
        seconds = phase.seconds(now)
        start = min(int((phase.start - boot.start) / span * width), width - 1)
        length = max(round(seconds / span * width), 1)
        bar = (" " * start + ("x" if phase.failure else "#") * length)[:width].ljust(width)
        moved = f"  {size(phase.bytes)}" if phase.bytes else ""
        rate = f" at {size(phase.rate)}/s" if phase.rate else ""
        ongoing = "" if phase.done else " so far"
        lines.append(f"  {phase.label.ljust(label_width)}  |{bar}|  {duration(seconds)}{ongoing}{moved}{rate}")
        if phase.failure:
            lines.append(f"  {''.ljust(label_width)}   failed here: {phase.failure}")
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    booter = open_core(configuration.load(args.config))
    mac = canonical_mac(args.mac)
    history = booter.history()
    node = history.node(mac)
    if node is None:
        raise NotFound(f"no machine {mac} has asked this server for anything yet (store: {history.location})")
    events = history.recent_events(mac, max(args.limit, 1))
    width = max((len(e.kind) for e in events), default=0)
    for event in events:
        print(f"{clock(event.time)}  {event.kind.ljust(width)}  {summarize(event)}")
    view = machine_view(booter, node)
    progress = view.progress
    where = f" ({progress.done}/{progress.total})" if progress.done else ""
    print()
    print(f"machine:  {mac}{f' ({view.hostname})' if view.hostname else ''}")
    print(f"state:    {node.state}{where}{'; marked for re-provisioning' if node.reprovision else ''}")
    print(f"profile:  {view.profile or 'none: boots nothing from us'}{f' (group {view.group})' if view.group else ''}")
    print(f"why:      {view.reason}")
    print(f"host key: {view.fingerprint or 'not pinned yet (pinned when the node phones home)'}")
    boot = latest(events)
    print()
    print("\n".join(waterfall_text(boot, time.time())) if boot else "no boot yet")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    mac = canonical_mac(args.mac)
    spec = open_core(config).boot_spec(mac)
    profile = spec.profile
    print(f"# {mac}: {spec.reason}")
    if profile is None or (profile.disk is None and profile.deploy is None):
        print("# nothing to provision: the profile has no [disk] or [deploy]")
        return 0
    if profile.disk is not None:
        wipe = args.wipe or profile.disk.wipe
        print(f"# disk {profile.disk.device} (wipe {'allowed' if wipe else 'refused if it holds partitions'}):")
        print(dry_run(profile.disk, wipe=wipe), end="")
    if profile.deploy is not None:
        root = TARGET_ROOT if profile.disk is not None else ""
        deploy = profile.deploy
        print(f"# deploy onto {root or '/'}:")
        for item in (*deploy.files, *deploy.templates):
            print(f"put {item.source} -> {root}{item.dest} (mode {item.mode:04o})")
        if deploy.tls_dir:
            print(f"TLS: node.key made on the node, its CSR signed by our CA -> {root}{deploy.tls_dir}/node.key, "
                  "node.crt, ca.crt")
        for unit in deploy.units:
            print(f"install unit {unit.source.name}{' and enable it' if unit.enable else ''}")
        if deploy.check:
            print(f"check: {deploy.check}")
    return 0


def cmd_reprovision(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    booter = open_core(config)
    mac = canonical_mac(args.mac)
    if args.now:
        result = asyncio.run(booter.reprovision_now(mac))
        print(f"{mac} will be provisioned again on this boot (its disk may be wiped)")
        return _print_netboot(result)
    print(f"{mac} will be provisioned again on its next boot (its disk may be wiped)")
    if not booter.reprovision(mac):
        print("reboot it to start")
    elif asyncio.run(booter.provisioner().reboot(mac)):
        print("its installed OS was told to reboot (over SSH, its pinned host key)")
    else:
        print("its installed OS could not be rebooted over SSH (see `bootserver show MAC`): reboot it by hand")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    booter = open_core(configuration.load(args.config))
    if args.parallel is not None:
        booter.power_control().concurrency = max(args.parallel, 1)
    macs = booter.deploy_targets(args.targets)
    results = asyncio.run(booter.deploy(macs, now=args.now))
    if not args.now:
        print("\n".join(f"{mac}: provisioned on its next boot (its disk may be wiped)" for mac in macs))
        print("boot them to start (or again with --now: through their BMCs)")
        return 0
    return max((_print_netboot(result) for result in results), default=0)


def _print_netboot(result: Netboot) -> int:
    """One machine's `--now`: what its BMC did; 1 when it was not powered."""
    override = "the next boot is from the network" if result.boot_override == "kept" else (
        f"WARNING: one-time network boot {result.boot_override}")
    if result.error:
        print(f"{result.mac}: NOT booted: {result.error}")
        return 1
    print(f"{result.mac}: power cycled; {override}")
    return 0


def cmd_power(args: argparse.Namespace) -> int:
    booter = open_core(configuration.load(args.config))
    mac = canonical_mac(args.mac)
    result = asyncio.run(booter.power(mac, args.action))
    print(f"{mac}: {'power is ' + result if args.action == 'status' else args.action + ' sent'}")
    return 0


def cmd_bmc_encrypt(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    os.umask(0o077)  # the secret key file, if made now, is ours alone
    password = getpass.getpass("BMC password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise BootserverError("no password given (on standard input or at the prompt)")
    print(encrypt_secret(config.server.secret_key_path, password))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    booter = open_core(config)
    mac = canonical_mac(args.mac)
    booter.approve(mac)
    print(f"{mac} may be provisioned for {config.server.window_minutes} minutes: its next boot gets a token, "
          f"its first accepted phone-home closes the window")
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    store = open_store(config, args.database, migrate=False)
    before, after = store.migrate()
    print(f"{store.location}: schema version {before} -> {after}" if before != after
          else f"{store.location}: schema version {after}, current")
    store.close()
    return 0


def cmd_db_copy(args: argparse.Namespace) -> int:
    if not args.source.is_file():
        raise BootserverError(f"{args.source}: no such SQLite file (it is data_dir/bootserver.sqlite3)")
    source, target = Store(args.source), Store(args.target)
    counts = source.copy_into(target)
    print(f"copied {', '.join(f'{n} {table}' for table, n in counts.items())} into {target.location}")
    print("next: put the old server's data_dir/keys on the first replica's data_dir before it starts (it moves "
          "them into the database), then start every replica with the same secret_key_file")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from .tools.image import build_agent_image

    config = configuration.load(args.config)
    out = args.out or config.server.data_dir / "images" / "agent"
    image = build_agent_image(out)
    print(f"agent image {image.version}: {image.kernel}, {image.initrd}")
    return 0


def cmd_image_secureboot(args: argparse.Namespace) -> int:
    from .tools.image import default_cache_dir
    from .tools.secureboot import fetch_secure_boot_files

    config = configuration.load(args.config)
    fetch_secure_boot_files(args.out or config.server.secure_boot_files, default_cache_dir(),
                            lambda line: print(line, flush=True), suite=args.suite, mirror=args.mirror)
    return 0


def cmd_image_os(args: argparse.Namespace) -> int:
    from .tools.osimage import build_os_image, debian_recipe

    config = configuration.load(args.config)
    out = args.out or config.server.data_dir / "images" / "os"
    built = build_os_image(debian_recipe(args.suite, args.mirror, args.security_mirror), out,
                           lambda line: print(line, flush=True))
    data_dir = config.server.data_dir
    asset = built.tarball.relative_to(data_dir) if built.tarball.is_relative_to(data_dir) else built.tarball
    print(f"{built.tarball}: sha256 {built.sha256}")
    print(f'as an asset: [assets] debian-{args.suite} = "{asset}"')
    return 0


def _lab_dir(args: argparse.Namespace) -> Path:
    return args.dir or configuration.load(args.config).server.data_dir / "lab"


def cmd_lab_up(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    lab = Lab(_lab_dir(args), address=IPv4Interface(args.address), bmc_driver=args.bmc)
    lab.up(args.vms, args.firmware, args.image_dir or config.server.data_dir / "images" / "agent")
    print(f"{args.vms} VMs started; waiting until each runs its installed OS and service (or fails)...", flush=True)
    lab.wait_running(args.vms, timeout=args.timeout, progress=lambda line: print(line, flush=True))
    print(lab.status())
    print(f"serial consoles: {lab.dir}/vm*.serial.log; server log: {lab.dir}/server.log; "
          f"stop with `bootserver lab down`")
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    lab = Lab.load(_lab_dir(args))
    print(json.dumps(lab.status_json(), indent=2) if args.json else lab.status())
    return 0


def cmd_lab_down(args: argparse.Namespace) -> int:
    for line in Lab.load(_lab_dir(args)).down():
        print(line)
    return 0


def _ago(when: float) -> str:
    seconds = int(time.time() - when)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{seconds // scale}{unit} ago"
    return f"{seconds}s ago"


if __name__ == "__main__":
    sys.exit(main())
