"""Provisioning jobs: states across failures and restarts, the phone-home deadline, group context."""

import time

from bootserver.jobs import Provisioner


def test_restart_marks_in_progress_nodes_interrupted(booter):
    store = booter.store
    store.record("52:54:00:00:00:01", "step-started", {"step": "disk"}, state="disk")
    store.record("52:54:00:00:00:02", "deployed", {}, state="deployed")
    Provisioner(booter).recover()
    node = store.node("52:54:00:00:00:01")
    assert node.state == "interrupted" and node.reprovision  # its half-made disk may be wiped next time
    assert store.events(node.mac)[-1].detail == {"reason": "the server stopped during disk"}
    assert store.node("52:54:00:00:00:02").state == "deployed"


def test_node_that_never_phones_home_fails_with_a_reason(booter):
    store = booter.store
    store.record("52:54:00:00:00:01", "file-served", {"file": "vmlinuz"}, state="kernel-served")
    provisioner = Provisioner(booter)
    provisioner.sweep()
    assert store.node("52:54:00:00:00:01").state == "kernel-served"  # not yet due
    provisioner.sweep(now=time.time() + booter.config.server.phone_home_minutes * 60 + 1)
    node = store.node("52:54:00:00:00:01")
    assert node.state == "failed"
    assert "did not phone home within 20 minutes" in store.events(node.mac)[-1].detail["reason"]


def test_job_context_lists_the_whole_group(booter):
    store = booter.store
    store.record("52:54:00:00:00:01", "x", {})
    store._db.execute("UPDATE machines SET ip = '10.0.0.1', host_key = 'ssh-ed25519 AAAA' WHERE mac = ?",
                      ("52:54:00:00:00:01",))
    node = store.node("52:54:00:00:00:01")
    context = Provisioner(booter).context(node, "raft", "raft", "node1")
    assert [(m["hostname"], m["ip"]) for m in context["group"]] == [("node1", "10.0.0.1"), ("node2", None)]
    assert context["node"]["hostname"] == "node1"


def test_profile_without_disk_or_deploy_needs_no_job(booter):
    booter.store.record("52:54:00:00:00:01", "x", {})
    assert Provisioner(booter).job(booter.store.node("52:54:00:00:00:01")) is None
    assert booter.store.events("52:54:00:00:00:01")[-1].kind == "nothing-to-provision"


def test_deployed_machine_boots_its_disk_until_reprovisioned(booter):
    from bootserver.booter import Urls

    urls = Urls("http://h", "http://h")
    booter.store.record("52:54:00:00:00:01", "deployed", {}, state="deployed")
    assert "sanboot" in booter.machine_script("52:54:00:00:00:01", {}, urls, "http").data.decode()
    booter.reprovision("52-54-00-00-00-01")
    node = booter.store.node("52:54:00:00:00:01")
    assert node.reprovision and node.state == "reprovision"
    assert "kernel http://h/boot/" in booter.machine_script("52:54:00:00:00:01", {}, urls, "http").data.decode()
