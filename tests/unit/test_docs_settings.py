"""The settings reference (docs/reference/settings.md) documents conf.SETTINGS as it is."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reliable_tasks.conf import SETTINGS

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "settings.md"

# A row of the summary table: | `RELIABLE_TASKS_NAME` | type | default | meaning |
ROW = re.compile(
    r"^\|\s*`RELIABLE_TASKS_(?P<name>[A-Z0-9_]+)`\s*"
    r"\|(?P<type>[^|]*)\|(?P<default>[^|]*)\|(?P<meaning>[^|]*)\|\s*$"
)


def summary_rows() -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match is None:
            continue
        name = match["name"]
        assert name not in rows, f"RELIABLE_TASKS_{name} has two rows in {REFERENCE.name}"
        rows[name] = {part: value.strip() for part, value in match.groupdict().items()}
    return rows


def as_documented(value: Any) -> str:
    """A default written the way the reference writes it: Python, strings in double quotes."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, timedelta):
        return repr(value).removeprefix("datetime.")
    return repr(value)


def types_as_documented(types: tuple[type, ...]) -> str:
    return " or ".join(f"`{'None' if t is type(None) else t.__name__}`" for t in types)


def test_every_setting_in_conf_has_a_row_in_the_reference() -> None:
    missing = sorted(set(SETTINGS) - set(summary_rows()))
    assert not missing, f"document these in {REFERENCE}: {missing}"


def test_the_reference_documents_no_setting_that_conf_lacks() -> None:
    stale = sorted(set(summary_rows()) - set(SETTINGS))
    assert not stale, f"these are documented in {REFERENCE} but not in conf.SETTINGS: {stale}"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_documented_type_and_default_are_the_ones_conf_uses(name: str) -> None:
    row = summary_rows().get(name)
    assert row is not None, f"RELIABLE_TASKS_{name} is not in {REFERENCE.name}"
    spec = SETTINGS[name]
    assert row["type"] == types_as_documented(spec.types)
    assert row["default"].startswith(f"`{as_documented(spec.default)}`"), row["default"]
    assert row["meaning"], f"RELIABLE_TASKS_{name} has no meaning in the summary"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_each_setting_has_its_own_labelled_section(name: str) -> None:
    label = "setting-" + name.lower().replace("_", "-")
    section = f"({label})=\n### `RELIABLE_TASKS_{name}`\n"
    assert section in REFERENCE.read_text(encoding="utf-8"), (
        f"add a section to {REFERENCE.name}:\n{section}"
    )
