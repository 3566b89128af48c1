"""A machine's lifecycle: its states, and which of them let a boot of it receive secrets.

    new / discovered -> script-served -> kernel-served -> phoned-home -> disk -> deploy -> finishing -> deployed
    any step -> failed (a command failed) | interrupted (the node or the server went away)
    deployed -> reprovision (an operator asked) -> script-served -> ...

States are str-valued, so the text in the store is the state's value. Only the core and the provisioner
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
    DEPLOY = "deploy"
    FINISHING = "finishing"
    DEPLOYED = "deployed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    REPROVISION = "reprovision"


# The happy path, in order.
PROGRESS = (State.SCRIPT_SERVED, State.KERNEL_SERVED, State.PHONED_HOME, State.DISK, State.DEPLOY,
            State.FINISHING, State.DEPLOYED)
# A provisioning step -> the machine's state while it runs.
STEP_STATES = {"disk": State.DISK, "deploy": State.DEPLOY, "finish": State.FINISHING}
# Being provisioned: a server that stops here leaves the machine interrupted; nobody may claim a new boot of it.
IN_PROGRESS = (State.PHONED_HOME, *STEP_STATES.values())
# States in which a boot of the machine is expected, so its script may carry a phone-home token (when its
# window is open). Not deployed (its disk boots), not in progress (a script request then is someone else).
EXPECTS_BOOT = frozenset({State.DISCOVERED, State.NEW, State.SCRIPT_SERVED, State.KERNEL_SERVED, State.FAILED,
                          State.INTERRUPTED, State.REPROVISION})
# The only state a served kernel moves a machine out of: a kernel fetched in any other state is an event only.
KERNEL_FROM = (State.SCRIPT_SERVED,)
