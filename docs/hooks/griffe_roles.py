"""A griffe extension: the docstrings' Sphinx roles become checked cross-references.

The docstrings follow optax's style, where ``:func:`~fusedloss.linear_cross_entropy```
names another object. mkdocstrings renders Markdown, so each role is rewritten into an
autorefs link (``[`linear_cross_entropy`][fusedloss.linear_cross_entropy]``), which
``mkdocs build --strict`` fails on when it does not resolve. A bare name links to the
top-level name (``fusedloss.__all__``) or to its own documented submodule's name;
any other bare name (a private helper) and a role naming something outside fusedloss
(``jax.*``) become plain code.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import griffe

import fusedloss


def _submodules() -> list[str]:
    spec = importlib.util.spec_from_file_location(
        "fusedloss_docs_reference", Path(__file__).with_name("reference.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUBMODULES


SUBMODULES = _submodules()
ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|obj|exc):`(~?)([\w.]+)`")


class SphinxRolesToAutorefs(griffe.Extension):
    """Rewrites ``:role:`target``` in every docstring when its object is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        module = obj.module.path

        def link(match: re.Match[str]) -> str:
            short, target = match.group(1) == "~", match.group(2)
            if "." not in target:
                if target in fusedloss.__all__:
                    target = f"fusedloss.{target}"
                elif module in SUBMODULES:
                    target = f"{module}.{target}"
            text = target.rsplit(".", 1)[-1] if short else match.group(2)
            if not target.startswith("fusedloss.") or "." not in target:
                return f"`{text}`"
            return f"[`{text}`][{target}]"

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
