"""File-system checks asked at most once a second: what each boot script would otherwise stat (recheck.py)."""

import time

from bootserver.recheck import RECHECK_SECONDS, FilePresence, at_most_every
from bootserver.templates import Templates


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_check_is_asked_again_only_once_its_interval_is_over():
    clock, asked = Clock(), []
    check = at_most_every(1.0, lambda: asked.append(clock.now) or len(asked) % 2 == 1, clock)
    assert check() is True and check() is True  # the answer of the first call, made when it was built
    clock.now += 0.999
    assert check() is True and asked == [1000.0]
    clock.now += 0.001
    assert check() is False and asked == [1000.0, 1001.0]
    assert check() is False and len(asked) == 2


def test_a_file_that_appears_or_goes_is_seen_within_the_interval(tmp_path):
    clock, kernel = Clock(), tmp_path / "vmlinuz"
    presence = FilePresence(1.0, clock)
    assert presence.is_file(kernel) is False
    kernel.write_bytes(b"k")
    assert presence.is_file(str(kernel)) is False  # asked less than a second ago: str and Path are one key
    clock.now += 1.0
    assert presence.is_file(kernel) is True
    kernel.unlink()
    assert presence.is_file(kernel) is True
    clock.now += 1.0
    assert presence.is_file(kernel) is False
    assert presence.is_file(tmp_path) is False  # a directory is no kernel


def test_an_edited_template_is_rendered_within_the_interval(tmp_path):
    (tmp_path / "mine.ipxe.j2").write_text("#!ipxe\necho first {{ mac }}\n")
    templates = Templates(tmp_path)
    assert templates.render("mine.ipxe.j2", mac="m") == "#!ipxe\necho first m\n"
    (tmp_path / "mine.ipxe.j2").write_text("#!ipxe\necho second {{ mac }}\n")
    deadline = time.monotonic() + RECHECK_SECONDS + 2
    while (text := templates.render("mine.ipxe.j2", mac="m")) != "#!ipxe\necho second m\n":
        assert time.monotonic() < deadline, f"still {text!r} {RECHECK_SECONDS + 2} s after the edit"
        time.sleep(0.05)
