"""A machine's lifecycle: its states, the kinds of event it records, and which states let a boot receive secrets.

    new / discovered -> script-served -> kernel-served -> phoned-home -> disk -> install -> deploy -> finishing
        -> rebooting (into the installed OS) -> booted (it reported) -> running (its health checks pass)
        -> deployed, instead of rebooting, when the profile installs no OS (files onto a disk or a live system)
    any step -> failed (a command failed, no report in time, checks never passed)
             | interrupted (the node or the server went away)
    running / deployed -> reprovision (an operator asked) -> script-served -> ...

States and event kinds are str-valued, so the text in the store is their value. Only the core and the provisioner
move a machine between states; a file or script request never moves a deployed machine back.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    DISCOVERED = "discovered"  # seen (DHCP, a file) before it asked for its script
    NEW = "new"  # enroll = "approve": seen, waiting for an operator to open its provisioning window
    SCRIPT_SERVED = "script-served"
    KERNEL_SERVED = "kernel-served"
    PHONED_HOME = "phoned-home"
    DISK = "disk"
    INSTALL = "install"
    DEPLOY = "deploy"
    FINISHING = "finishing"
    REBOOTING = "rebooting"  # into the installed OS, which has a one-time token to report its first boot with
    BOOTED = "booted"  # the installed OS reported; its health checks run
    RUNNING = "running"
    DEPLOYED = "deployed"  # files deployed, nothing to boot into: the end of a profile without an OS
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    REPROVISION = "reprovision"


# The happy path, in order.
PROGRESS = (State.SCRIPT_SERVED, State.KERNEL_SERVED, State.PHONED_HOME, State.DISK, State.INSTALL, State.DEPLOY,
            State.FINISHING, State.REBOOTING, State.BOOTED, State.RUNNING)
# A provisioning step -> the machine's state while it runs.
STEP_STATES = {"disk": State.DISK, "install": State.INSTALL, "deploy": State.DEPLOY, "finish": State.FINISHING}
# Its installed OS answers SSH with the host key pinned at install: reprovisioning reboots it into the flow.
RUNS_INSTALLED_OS = frozenset({State.BOOTED, State.RUNNING})
# The machine boots its own disk: a script request gets the local-disk script, never the agent.
FROM_DISK = frozenset({State.REBOOTING, State.BOOTED, State.RUNNING, State.DEPLOYED})
# Being provisioned: a server that stops here leaves the machine interrupted; nobody may claim a new boot of it.
IN_PROGRESS = (State.PHONED_HOME, *STEP_STATES.values())
# States in which a boot of the machine is expected, so its script may carry a phone-home token (when its
# window is open). Not from its disk (FROM_DISK), not in progress (a script request then is someone else).
EXPECTS_BOOT = frozenset({State.DISCOVERED, State.NEW, State.SCRIPT_SERVED, State.KERNEL_SERVED, State.FAILED,
                          State.INTERRUPTED, State.REPROVISION})
# A script carrying a token moves a machine to script-served from any state but these: its record, written behind
# (Store.record_behind), must not move back a machine that phoned home meanwhile.
SCRIPT_FROM = frozenset(State).difference(IN_PROGRESS)
# The only state a served kernel moves a machine out of: a kernel fetched in any other state is an event only.
KERNEL_FROM = (State.SCRIPT_SERVED,)
# Off the happy path: how the pages show a machine there.
OFF_PATH = {State.FAILED: "bad", State.INTERRUPTED: "bad", State.REPROVISION: "busy", State.DISCOVERED: "idle",
            State.NEW: "idle", State.DEPLOYED: "ok"}


class EventKind(StrEnum):
    """What can happen to a machine: each is an event in its timeline."""

    DHCP = "dhcp"  # a DHCP request and what we answered
    SCRIPT_SERVED = "script-served"  # its iPXE script (with a token when its window is open)
    NO_BOOT = "no-boot"  # a script that boots nothing from us, and why
    WAITING = "waiting"  # no provisioning window: told to wait (enroll = "approve", "known")
    APPROVED = "approved"  # an operator opened its window
    CLAIM_CONFLICT = "claim-conflict"  # a second address claimed it while a token of it was live
    FILE_SERVED = "file-served"
    FILE_FAILED = "file-failed"
    REFUSED = "refused"  # a token or phone-home refused, and why
    PHONED_HOME = "phoned-home"
    RESUMED = "resumed"  # another replica took its job over
    STEP_STARTED = "step-started"
    STEP_DONE = "step-done"
    STEP_FAILED = "step-failed"
    COMMAND = "command"  # one command of a step, with exit status and output tails
    CONNECT_FAILED = "connect-failed"
    HOST_KEY_MISMATCH = "host-key-mismatch"
    CERTIFICATE_ISSUED = "certificate-issued"
    NOTHING_TO_PROVISION = "nothing-to-provision"
    INSTALL_PROGRESS = "install-progress"  # bytes of the OS written so far, at most once a second
    INSTALLED = "installed"  # the OS is on the disk: its kernel, boot loaders and pinned host key
    DEPLOYED = "deployed"
    REBOOTING = "rebooting"  # into the installed OS
    BOOTED = "booted"  # the installed OS's first-boot report: kernel, boot id, failed units
    HEALTH_WAITING = "health-waiting"  # checks not yet passing (recorded when what fails changes)
    HEALTH_PASSED = "health-passed"
    RUNNING = "running"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    REPROVISION_REQUESTED = "reprovision-requested"
    REBOOT_SENT = "reboot-sent"  # reprovisioning a machine that runs its installed OS: rebooted over SSH
    REBOOT_FAILED = "reboot-failed"
    BOOT_FROM_DISK_REQUESTED = "boot-from-disk-requested"
    # The BMC (bootserver/power/): every call is one event with its action, result or error, and seconds taken.
    POWER_STATUS = "power-status"  # read on request, or by the poll when the state (or the error) changed
    POWER_ON = "power-on"
    POWER_OFF = "power-off"
    POWER_SOFT_OFF = "power-soft-off"  # an ACPI shutdown asked of the OS
    POWER_CYCLE = "power-cycle"  # off and on (a hard reset when on; on when off)
    POWER_FAILED = "power-failed"  # a BMC call failed: unreachable, refused, timed out, or an error answer
    BOOT_OVERRIDE_SET = "boot-override-set"  # the next boot from the network, read back as set
    BOOT_OVERRIDE_LOST = "boot-override-lost"  # the BMC accepted it, but reading it back shows it did not keep it
    BMC_INVENTORY = "bmc-inventory"  # manufacturer, model, serial, BIOS version (Redfish), into the facts


# A power action -> the event kind of its success.
POWER_KINDS = {"status": EventKind.POWER_STATUS, "on": EventKind.POWER_ON, "off": EventKind.POWER_OFF,
               "soft-off": EventKind.POWER_SOFT_OFF, "cycle": EventKind.POWER_CYCLE}


# Kinds that mean something went wrong, or went right (a command's own exit status decides for `command`).
BAD_KINDS = frozenset({EventKind.FAILED, EventKind.INTERRUPTED, EventKind.STEP_FAILED, EventKind.FILE_FAILED,
                       EventKind.REFUSED, EventKind.CONNECT_FAILED, EventKind.HOST_KEY_MISMATCH, EventKind.NO_BOOT,
                       EventKind.CLAIM_CONFLICT, EventKind.REBOOT_FAILED, EventKind.POWER_FAILED,
                       EventKind.BOOT_OVERRIDE_LOST})
GOOD_KINDS = frozenset({EventKind.DEPLOYED, EventKind.STEP_DONE, EventKind.PHONED_HOME, EventKind.CERTIFICATE_ISSUED,
                        EventKind.INSTALLED, EventKind.BOOTED, EventKind.HEALTH_PASSED, EventKind.RUNNING,
                        EventKind.BOOT_OVERRIDE_SET})
