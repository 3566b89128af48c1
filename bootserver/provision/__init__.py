"""Provisioning: from a node that phoned home to a node running its profile's services.

The flow, one room per step:

    jobs.py     claim a queued job (one per machine, under the concurrency cap, held by a lease),
                turn its step events into machine states, settle what failures and restarts leave
    steps.py    the step driver: over one SSH session run "disk", "deploy", then "finish"
    ssh.py      the session: log in with the server's key, trusting only the pinned host key;
                run each command with a timeout, insist on exit 0, report it as an event
    disk.py     the disk step's commands: partition, format and mount the profile's layout
    deploy.py   the deploy step: files, rendered templates, TLS certificate, systemd units, over SFTP
    pki.py      the server's keys: its SSH login key and the CA that signs the node's certificate request

What a profile asks for (its disk layout and deployment, and their TOML) is configuration:
`bootserver.config` (disk.py, deploy.py). The finish step syncs, unmounts the disk and reboots the node into it.
"""

from .jobs import Provisioner
from .pki import IssuedCertificate, ServerKeys, open_keys
from .ssh import HostKeyMismatch, NodeAccess, NodeLost, StepFailed, session
from .steps import Job, provision

__all__ = ["HostKeyMismatch", "IssuedCertificate", "Job", "NodeAccess", "NodeLost", "Provisioner", "ServerKeys",
           "StepFailed", "open_keys", "provision", "session"]
