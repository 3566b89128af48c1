"""iPXE scripts are jinja2 templates in `ipxe/`, their GRUB twins (the Secure Boot chain) in `grub/`; this module is
the one place that renders them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from . import grubcfg
from .errors import BootserverError
from .recheck import RECHECK_SECONDS, at_most_every


def builtin_templates_dir(name: str = "ipxe") -> Path:
    """`ipxe/` (or `grub/`) in a source checkout, or the copy packed into the wheel next to this module."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bootserver's {name} templates are missing (looked in {here}/{name} and "
                            f"{here.parent}/{name}): reinstall bootserver")


class _RecheckingLoader(jinja2.FileSystemLoader):
    """jinja2's, but whether a template file changed is asked at most once a second (recheck.py): jinja asks on
    every render, and each boot script renders one."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Any]:
        source, filename, uptodate = super().get_source(environment, template)
        return source, filename, at_most_every(RECHECK_SECONDS, uptodate)


class Templates:
    """The operator's templates (if any) first, then ours. Undefined variables are errors, not blanks."""

    def __init__(self, extra_dir: Path | None = None) -> None:
        builtin = (builtin_templates_dir("ipxe"), builtin_templates_dir("grub"))
        dirs = [str(d) for d in (extra_dir, *builtin) if d is not None]
        self._env = jinja2.Environment(
            loader=_RecheckingLoader(dirs),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # iPXE scripts, not HTML; values are checked before they get here
            keep_trailing_newline=True,
        )
        # GRUB expands `$` and splits on blanks and `;`: every value from a config or a node goes through these.
        self._env.filters["grub_quote"] = grubcfg.quote
        self._env.filters["grub_words"] = grubcfg.words
        self._compiled: dict[str, jinja2.Template] = {}  # command lines from the config: a handful

    def render(self, name: str, **context: Any) -> str:
        return self._env.get_template(name).render(**context)

    def render_file(self, path: Path, context: dict[str, Any]) -> str:
        """An operator's config-file template (deployed to nodes), with the same strict rules.

        An undefined variable raises a BootserverError naming the file and the variable.
        """
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(path.parent)), undefined=jinja2.StrictUndefined,
                                 keep_trailing_newline=True, autoescape=False)
        try:
            return env.get_template(path.name).render(**context)
        except jinja2.UndefinedError as exc:
            raise BootserverError(f"template {path}: {exc.message}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise BootserverError(f"template {path}, line {exc.lineno}: {exc.message}") from None

    def render_string(self, source: str, **context: Any) -> str:
        """Render a snippet from the config (a kernel command line) with the same rules."""
        if "{" not in source:  # no expression, statement or comment: most command lines, on every boot script
            return source
        # Compiled once per distinct source: compiling costs more than rendering, on every boot script.
        compiled = self._compiled.get(source)
        if compiled is None:
            compiled = self._compiled[source] = self._env.from_string(source)
        return compiled.render(**context)
