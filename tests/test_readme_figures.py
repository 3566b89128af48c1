"""Every figure in the README's measured tables is found in a results file the README cites beside that table.

The measured tables are those under "## Tests" and "## Benchmarks". For each, the cited files are the
`benchmarks/results/...` paths named in the prose from the end of the previous table to the start of the next
one (the paragraph that introduces it and the footnotes under it). Each cited file must exist and name a commit
of this repository, and every number of the table's cells (its `target` column aside: those are the issues'
goals, not measurements) must appear in one of them as a number of its own.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MEASURED_SECTIONS = ("## Tests", "## Benchmarks")
CITED = re.compile(r"benchmarks/results/[\w.-]*\w")
# A number as written: 1,329 / 57.0 / 0.64 (of 0.64x) / 16 (of 16.2-16.8 both parts are taken).
NUMBER = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?![\d])|(?<![\w.])\d+(?:\.\d+)?(?![\d])")
COMMIT = re.compile(r"\b[0-9a-f]{7,40}\b")


@dataclass
class Table:
    section: str
    first_line: int  # 1-based, for messages
    header: list[str]
    rows: list[list[str]]
    cited: set[str]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def numbers(text: str) -> set[str]:
    # Backquoted text is code (test ids, commands), not a figure.
    text = re.sub(r"`[^`]*`", " ", text)
    return {found.replace(",", "") for found in NUMBER.findall(text)}


def measured_tables(lines: list[str]) -> list[Table]:
    """The tables of the measured sections, each with the results files cited in the prose before and after it."""
    tables: list[Table] = []
    section, prose, previous, inside = "", [], None, False

    def cite(*neighbours: Table | None) -> None:
        found = set(CITED.findall("\n".join(prose)))
        for table in neighbours:
            if table is not None:
                table.cited |= found

    for number, line in enumerate(lines, 1):
        is_row = section in MEASURED_SECTIONS and line.startswith("|")
        if line.startswith("## "):
            cite(previous)
            section, prose, previous = line.strip(), [], None
        elif is_row and inside:
            if not set(line) <= set("|-: "):
                previous.rows.append(cells(line))
        elif is_row:
            table = Table(section, number, cells(line), [], set())
            cite(previous, table)
            tables.append(table)
            prose, previous = [], table
        else:
            prose.append(line)
        inside = is_row
    cite(previous)
    return tables


TABLES = measured_tables(README.read_text().splitlines())


def table_id(table: Table) -> str:
    return f"README:{table.first_line}"


def test_the_readme_has_measured_tables():
    assert {table.section for table in TABLES} == set(MEASURED_SECTIONS), "a measured section lost its table"
    assert len(TABLES) >= 3


@pytest.mark.parametrize("table", TABLES, ids=table_id)
def test_cited_results_exist_and_name_a_commit_of_this_repository(table: Table):
    assert table.cited, f"README line {table.first_line}: no benchmarks/results file is cited beside this table"
    for path in sorted(table.cited):
        file = ROOT / path
        assert file.is_file(), f"README cites {path}, which is not in the repository"
        commits = [sha for sha in COMMIT.findall(file.read_text()) if is_commit(sha)]
        assert commits, f"{path} names no commit of this repository"


@pytest.mark.parametrize("table", TABLES, ids=table_id)
def test_every_figure_of_the_table_is_in_a_cited_result(table: Table):
    stored = set()
    for path in table.cited:
        if (ROOT / path).is_file():
            stored |= numbers((ROOT / path).read_text())
    skip = {index for index, name in enumerate(table.header) if name.lower() == "target"}
    missing = []
    for row in table.rows:
        for index, cell in enumerate(row):
            if index in skip:
                continue
            missing += [f"{figure} ({row[0]!r})" for figure in sorted(numbers(cell) - stored)]
    assert not missing, (f"README line {table.first_line}: figures found in none of "
                         f"{sorted(table.cited)}: " + ", ".join(missing))


def test_the_checker_catches_a_figure_no_result_holds(tmp_path: Path):
    """The test above would pass on anything if the table parser found no rows or no citations."""
    lines = ["## Tests", "", "From `benchmarks/results/x.md`:", "", "| what | s | target |", "| --- | --- | --- |",
             "| boot | 12.5 and 1,329 | >= 99 |", "", "## Other", "| a |", "| 7 |"]
    [table] = measured_tables(lines)
    assert table.cited == {"benchmarks/results/x.md"}
    assert table.rows == [["boot", "12.5 and 1,329", ">= 99"]]
    assert numbers("12.5 and 1,329 in `test[12]` ") == {"12.5", "1329"}
    assert numbers("16.2-16.8, 0.64x, 6/6") == {"16.2", "16.8", "0.64", "6"}


def is_commit(sha: str) -> bool:
    """A commit of this repository; in a shallow clone (which lacks older commits), any hex string with a letter
    that git does not know as another kind of object."""
    known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-t", sha], capture_output=True, text=True)
    if known.returncode == 0:
        return known.stdout.strip() == "commit"
    shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"],
                             capture_output=True, text=True)
    return shallow.stdout.strip() == "true" and re.search("[a-f]", sha) is not None  # not a plain number
