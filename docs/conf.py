"""Sphinx configuration: MyST Markdown pages, the furo theme, warnings are errors (make docs)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

project = "reliable_tasks"
author = "the reliable_tasks maintainers"
copyright = "the reliable_tasks maintainers"

try:
    release = version("reliable-tasks")
except PackageNotFoundError:  # building from a checkout that was never installed
    release = "unreleased"
version = release

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
# Headings up to ### get anchors, so pages can link to a section: [text](page.md#anchor).
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"reliable_tasks {release}"
