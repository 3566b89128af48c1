"""One lifecycle: every state has a place on the pages, every event kind a summary, and the README's state diagram
says what the code does."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import bootserver
from bootserver.lifecycle import IN_PROGRESS, OFF_PATH, PROGRESS, STEP_STATES, EventKind, State
from bootserver.web.views import _SUMMARIES, progress

PACKAGE = Path(bootserver.__file__).resolve().parent
README = (PACKAGE.parent / "README.md").read_text()


def test_every_state_has_a_place_on_the_progress_bar():
    assert set(PROGRESS) | set(OFF_PATH) == set(State)
    assert not set(PROGRESS) & set(OFF_PATH)
    assert [progress(s).done for s in PROGRESS] == list(range(1, len(PROGRESS) + 1))
    assert progress(State.RUNNING).tone == "ok" and progress(State.FAILED).tone == "bad"
    deployed = progress(State.DEPLOYED)
    assert (deployed.done, deployed.total, deployed.tone) == (len(PROGRESS), len(PROGRESS), "ok")


def test_every_event_kind_has_a_summary():
    assert set(EventKind) <= set(_SUMMARIES)


def test_provisioning_steps_are_states_in_progress():
    assert set(STEP_STATES.values()) < set(IN_PROGRESS) <= set(PROGRESS)


def recorded_kinds() -> set[str]:
    """Event kinds the package records by their literal name: the second argument of record(...) calls and the
    first of a provisioning step's record(kind, detail)."""
    kinds: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for call in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)):
            name = getattr(call.func, "attr", getattr(call.func, "id", ""))
            if name not in ("record", "_record", "hold", "open_window"):
                continue
            for arg in call.args[:3]:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and re.fullmatch(r"[a-z-]+", arg.value):
                    kinds.add(arg.value)
    return kinds


def test_every_recorded_kind_is_an_event_kind():
    kinds = recorded_kinds()
    assert {"deployed", "script-served"} <= kinds | {k.value for k in EventKind}  # the reader finds some
    assert kinds - {k.value for k in EventKind} - {s.value for s in State} == set()


def test_the_readme_state_diagram_is_the_lifecycle():
    line = re.search(r"`(script-served -> [^`]+)`", README.replace("->\n", "-> "))
    assert line, "README: the states line is gone"
    assert [s.strip() for s in line[1].split("->")] == [str(s) for s in PROGRESS]
    for state in OFF_PATH:
        assert f"`{state}`" in README, f"README does not name the state {state}"
