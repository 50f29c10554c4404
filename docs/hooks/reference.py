"""The API reference, generated from ``fusedloss.__all__`` and :data:`SUBMODULES`.

mkdocs hook (``mkdocs.yml``, ``hooks:``). It writes one page per group of top-level
names and one per submodule, each a list of ``::: name`` directives that mkdocstrings
renders from the docstrings, appends them to the navigation, and checks every public
name: a missing docstring, or a public function's docstring without ``Args:`` (when it
takes arguments), ``Returns:`` or a ``>>>`` example, is a warning, which
``mkdocs build --strict`` turns into a failed build.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
from typing import Any

from mkdocs.structure.files import File, Files

# The submodules users import, each documented on a page of its own. A new public
# submodule is one more line here.
SUBMODULES = [
    "fusedloss.objectives",
    "fusedloss.flax_heads",
    "fusedloss.post_training",
]

# The page of a top-level name, by the module that defines it (the longest matching
# prefix); a module matched by no prefix gets a page named after it, so a new name is
# never left out.
PAGES = {
    "fusedloss.heads.sharded": ("sharded", "Multiple devices"),
    "fusedloss.heads.xla": ("configs", "Implementations and their configs"),
    "fusedloss.heads.pallas_gpu": ("configs", "Implementations and their configs"),
    "fusedloss.heads.pallas_tpu": ("configs", "Implementations and their configs"),
    "fusedloss.heads": ("heads", "Fused heads"),
    "fusedloss.classification": ("standard_losses", "Standard losses"),
    "fusedloss._softmax_ce": ("standard_losses", "Standard losses"),
    "fusedloss.regression": ("standard_losses", "Standard losses"),
    "fusedloss.divergences": ("standard_losses", "Standard losses"),
    "fusedloss.regularization": ("standard_losses", "Standard losses"),
    "fusedloss._reduce": ("standard_losses", "Standard losses"),
}

log = logging.getLogger("mkdocs.hooks.reference")


def _page_of(module: str) -> tuple[str, str]:
    matches = [p for p in PAGES if module == p or module.startswith(p + ".")]
    if not matches:
        return module.removeprefix("fusedloss.").replace(".", "_"), f"`{module}`"
    return PAGES[max(matches, key=len)]


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__
        ]
    return list(names)


def _check(obj: Any) -> list[str]:
    """What the docstring of a public name lacks."""
    doc = inspect.getdoc(obj) if obj.__doc__ else None
    if not doc:
        return ["a docstring"]
    if inspect.isclass(obj) or not callable(obj):
        return []
    params = [
        p for p in inspect.signature(obj).parameters.values() if p.name not in ("self", "cls")
    ]
    missing = [] if not params or "Args:" in doc else ["an Args: section"]
    missing += [] if "Returns:" in doc or "Yields:" in doc else ["a Returns: section"]
    return missing + ([] if ">>> " in doc else ["an example (a >>> doctest)"])


def _generate() -> tuple[dict[str, str], list[tuple[str, str]], list[str]]:
    """The pages' markdown by path, the navigation's (title, path) and the problems."""
    import fusedloss

    problems: list[str] = []
    groups: dict[str, tuple[str, list[str]]] = {}
    # A top-level name that a submodule also exports is documented on that module's page.
    in_submodules = {
        id(getattr(module, n))
        for module in map(importlib.import_module, SUBMODULES)
        for n in _public_names(module)
    }
    for name in fusedloss.__all__:
        obj = getattr(fusedloss, name, None)
        if obj is None:
            problems.append(f"fusedloss.__all__ names {name!r}, which fusedloss lacks")
            continue
        if inspect.ismodule(obj):
            if obj.__name__ not in SUBMODULES:
                problems.append(f"fusedloss.{name} is a module missing from SUBMODULES")
            continue
        problems += [f"fusedloss.{name} lacks {m}" for m in _check(obj)]
        if id(obj) in in_submodules:
            continue
        slug, title = _page_of(obj.__module__)
        groups.setdefault(slug, (title, []))[1].append(f"fusedloss.{name}")

    pages: dict[str, str] = {}
    nav: list[tuple[str, str]] = []
    for slug, (title, paths) in groups.items():
        body = [f"::: {p}" for p in paths]
        pages[f"reference/{slug}.md"] = "\n\n".join([f"# {title}", *body]) + "\n"
        nav.append((title, f"reference/{slug}.md"))
    for modname in SUBMODULES:
        module = importlib.import_module(modname)
        for name in _public_names(module):
            obj = getattr(module, name)
            problems += [f"{modname}.{name} lacks {m}" for m in _check(obj)]
        slug = modname.removeprefix("fusedloss.")
        pages[f"reference/{slug}.md"] = f"# `{modname}`\n\n::: {modname}\n"
        nav.append((f"fusedloss.{slug}", f"reference/{slug}.md"))

    rows = []
    for title, path in nav:
        rows.append(f"\n## [{title}]({path.removeprefix('reference/')})\n")
        page_names = [line[4:] for line in pages[path].splitlines() if line.startswith("::: ")]
        for p in page_names:
            mod = importlib.import_module(p) if p in SUBMODULES else None
            if mod is None:
                rows.append(f"- [`{p}`][{p}]")
            else:
                rows += [f"- [`{p}.{n}`][{p}.{n}]" for n in _public_names(mod)]
    index = [
        "# API reference",
        "",
        "Every name in `fusedloss.__all__` and the public submodules, rendered from the",
        "docstrings. Import style: `import fusedloss`, then `fusedloss.linear_cross_entropy`,",
        "`fusedloss.objectives.causal_lm_objective`, `fusedloss.flax_heads.head_weights`.",
        *rows,
    ]
    pages["reference/index.md"] = "\n".join(index) + "\n"
    return pages, [("Overview", "reference/index.md"), *nav], problems


_state: dict[str, Any] = {}


def on_config(config: Any) -> Any:
    pages, nav, problems = _generate()
    for problem in problems:
        log.warning("API reference: %s", problem)
    _state["pages"] = pages
    config["nav"] = [*(config["nav"] or []), {"API reference": [{t: p} for t, p in nav]}]
    return config


def on_files(files: Files, config: Any) -> Files:
    for path, content in _state["pages"].items():
        files.append(File.generated(config, path, content=content))
    return files
