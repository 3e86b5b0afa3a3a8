"""A griffe extension for the API pages: Sphinx roles in docstrings become Markdown.

The library's docstrings cross-reference with reST roles (``:class:`~invert_ad.detector.AnomalyDetector```).
Fully qualified targets become optional autorefs links (a link where the target is on a page, plain code where
it is not, e.g. a private helper); relative ones, which only Sphinx could resolve, become code spans.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):`(?P<text>[^`<]+?)\s*(?:<(?P<target>[^>`]+)>)?`")


def _markdown(match: re.Match[str]) -> str:
    text = match["text"].strip()
    target = match["target"] or text.lstrip("~")
    title = text.lstrip("~").rsplit(".", 1)[-1] if text.startswith("~") else text
    if target.startswith("invert_ad."):
        return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'
    return f"`{title}`"


def rewrite_roles(docstring: str) -> str:
    """Replace every Sphinx role in ``docstring`` by a Markdown link or code span."""
    return ROLE.sub(_markdown, docstring)


class RstRoles(griffe.Extension):
    """Rewrite the docstring of every loaded object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite_roles(obj.docstring.value)
