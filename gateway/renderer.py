"""Rendering: MJML compiled once at start-up, Jinja2 per request.

Every template of every use case is loaded, compiled and rendered with sample
data when the renderer is built, so a missing variable or broken template stops
start-up (and `check`) naming the template, never a customer's send.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import jinja2
from jinja2 import meta, nodes
from jinja2.visitor import NodeTransformer
from markupsafe import Markup, escape
from mjml import mjml2html

from gateway import plugins
from gateway.config import Settings, TemplateSet
from gateway.errors import StartupError

ROLES = ("customer", "bank_team")

PRIORITY_COLOURS = {"low": "#4b5563", "normal": "#2563eb", "high": "#d97706", "urgent": "#dc2626"}

#: Tags mjml-python knows. It passes unknown tags through silently, so we refuse them here.
MJML_TAGS = frozenset(
    """
    mjml mj-head mj-body mj-attributes mj-all mj-class mj-breakpoint mj-font mj-html-attributes
    mj-html-attribute mj-selector mj-preview mj-style mj-title mj-accordion mj-accordion-element
    mj-accordion-text mj-accordion-title mj-button mj-carousel mj-carousel-image mj-column mj-divider
    mj-group mj-hero mj-image mj-include mj-navbar mj-navbar-link mj-raw mj-section mj-social
    mj-social-element mj-spacer mj-table mj-text mj-wrapper
    """.split()
)

SAMPLE_REQUEST = {
    "ticket_id": "TKT-2025-001234",
    "customer_id": "CUST-001",
    "customer_email": "customer@example.com",
    "query": "What is the interest rate for mortgage loans?",
    "reason": "Out of scope - Mortgages not in knowledge base",
}


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str


def nl2br(value: object) -> Markup:
    """Escape text for HTML and keep its line breaks visible."""
    return Markup("<br>\n").join(escape(str(value)).split("\n"))


def fill_url(template: str, values: Mapping[str, str]) -> str:
    """Fill a config URL template with URL-encoded values (no value can change the URL's shape)."""
    return template.format_map({k: quote(v, safe="") for k, v in values.items()})


@dataclass(frozen=True)
class _Part:
    template: jinja2.Template
    source: str  # what Jinja compiles: for HTML, the MJML compiler's output
    env: jinja2.Environment


@dataclass(frozen=True)
class _CompiledEmail:
    subject: _Part
    text: _Part
    html: _Part
    static: Mapping[str, Any]


class Renderer:
    """Holds the compiled templates of every (use case, role)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        search_path = [str(settings.base_dir), *(str(d) for d in plugins.template_dirs())]
        loader = jinja2.FileSystemLoader(search_path)
        common: dict[str, Any] = {"loader": loader, "undefined": jinja2.StrictUndefined}
        self._text_env = jinja2.Environment(autoescape=False, keep_trailing_newline=True, **common)  # noqa: S701
        self._html_env = jinja2.Environment(autoescape=True, **common)
        self._html_env.filters["nl2br"] = nl2br
        self._text_env.filters["nl2br"] = lambda value: value
        self._mjml_cache: dict[str, str] = {}
        self._emails: dict[tuple[str, str], _CompiledEmail] = {}
        for use_case, uc in settings.use_cases.items():
            for role in ROLES:
                block = getattr(uc, role)
                static = {
                    "use_case": use_case,
                    "use_case_title": uc.title,
                    "priority": uc.priority,
                    "priority_label": uc.priority.capitalize(),
                    "priority_color": PRIORITY_COLOURS[uc.priority],
                    "brand": settings.brand.model_dump(),
                    "wording": dict(block.wording),
                    **plugins.template_context(use_case, role),
                }
                where = f"use_cases.{use_case}.{role}.templates"
                refs: TemplateSet = block.templates
                self._emails[(use_case, role)] = _CompiledEmail(
                    subject=self._load(refs.subject, f"{where}.subject", static),
                    text=self._load(refs.text, f"{where}.text", static),
                    html=self._load_mjml(refs.html, f"{where}.html", static),
                    static=static,
                )
        self.slowest_render_seconds = self.self_test()

    # -- start-up ---------------------------------------------------------------------------------

    def _source(self, name: str, where: str) -> str:
        try:
            source, _, _ = self._text_env.loader.get_source(self._text_env, name)  # type: ignore[union-attr]
        except jinja2.TemplateNotFound:
            raise StartupError(
                f"{where}: template file {name!r} not found (paths are relative to {self.settings.base_dir})"
            ) from None
        return source

    def _compile(
        self, env: jinja2.Environment, source: str, name: str, where: str, static: Mapping[str, Any]
    ) -> _Part:
        try:
            tree = env.parse(source)
            template = env.from_string(_FoldStatic(static, tree).visit(tree))
        except jinja2.TemplateSyntaxError as err:
            raise StartupError(f"{where}: {name} line {err.lineno}: {err.message}") from None
        template.name = name
        return _Part(template=template, source=source, env=env)

    def _load(self, name: str, where: str, static: Mapping[str, Any]) -> _Part:
        return self._compile(self._text_env, self._source(name, where), name, where, static)

    def _load_mjml(self, name: str, where: str, static: Mapping[str, Any]) -> _Part:
        if name not in self._mjml_cache:
            self._mjml_cache[name] = self._compile_mjml(name, where)
        return self._compile(self._html_env, self._mjml_cache[name], name, where, static)

    def _compile_mjml(self, name: str, where: str) -> str:
        source = self._source(name, where)
        unknown = sorted(set(re.findall(r"<(mj-[a-z-]+)", source)) - MJML_TAGS)
        if unknown or not re.search(r"<mjml[\s>]", source):
            problem = f"unknown MJML tags {', '.join(unknown)}" if unknown else "no <mjml> root element"
            raise StartupError(f"{where}: {name}: {problem}")
        try:
            return str(mjml2html(source, fonts={}))
        except ValueError as err:
            raise StartupError(f"{where}: {name}: invalid MJML: {err}") from None

    def self_test(self) -> float:
        """Check every template's variables and render every email with sample data.

        Undeclared names are found even inside branches the sample does not take.
        Returns the slowest render in seconds."""
        slowest = 0.0
        for (use_case, role), email in self._emails.items():
            names = {*email.static, *SAMPLE_REQUEST, *PER_REQUEST_NAMES}
            for kind in ("subject", "text", "html"):
                part: _Part = getattr(email, kind)
                declared = meta.find_undeclared_variables(part.env.parse(part.source))
                missing = sorted(declared - names - set(part.env.globals))
                if missing:
                    raise StartupError(
                        f"missing template variable(s) {', '.join(missing)}: template "
                        f"{part.template.name} ({use_case} {role} {kind}) uses them but no use case "
                        "setting, wording key or request field provides them"
                    )
            started = time.perf_counter()
            self.render(use_case, role, SAMPLE_REQUEST, datetime.now(self.settings.zone))
            slowest = max(slowest, time.perf_counter() - started)
        return slowest

    # -- per request -------------------------------------------------------------------------------

    def render(
        self, use_case: str, role: str, request: Mapping[str, str], created_at: datetime
    ) -> RenderedEmail:
        email = self._emails[(use_case, role)]
        link_values = {
            "ticket_id": request["ticket_id"],
            "customer_id": request["customer_id"],
            "use_case": use_case,
        }
        stamp = created_at.strftime("%Y-%m-%d %H:%M %Z")
        context = {
            **email.static,
            **request,
            "created_at": stamp,
            "timestamp": stamp,  # the spec's name for it
            "tracking_url": fill_url(self.settings.links.tracking_url, link_values),
            "dashboard_url": fill_url(self.settings.links.dashboard_url, link_values),
        }
        try:
            subject = " ".join(email.subject.template.render(context).split())
            context["subject"] = subject
            text = email.text.template.render(context)
            html = email.html.template.render(context)
        except jinja2.UndefinedError as err:
            name = f"{use_case} {role}"
            raise StartupError(
                f"missing template variable in the template for {name}: {err.message}"
            ) from None
        return RenderedEmail(subject=subject, text=text, html=html)


#: variables the renderer adds per request, beside the request's own fields
PER_REQUEST_NAMES = ("created_at", "timestamp", "tracking_url", "dashboard_url", "subject")
#: what a template may read as a constant
_LITERALS = (str, int, float, bool)


class _FoldStatic(NodeTransformer):
    """Make the email's constants (brand, wording, use case, priority) literals in the template.

    Jinja writes literal output into the compiled template's text, escaped once, at compile
    time. Read as variables, they were looked up and escaped on every render, and MJML
    repeats the brand's colours and fonts dozens of times: most of a render's work (bench/).
    A name the template assigns itself (set, for, macro arguments), or one a request
    supplies, stays a variable; so does anything that is not a plain value.
    """

    def __init__(self, static: Mapping[str, Any], tree: nodes.Template) -> None:
        assigned = {n.name for n in tree.find_all(nodes.Name) if n.ctx != "load"}
        per_request = {*SAMPLE_REQUEST, *PER_REQUEST_NAMES}
        self.static = {k: v for k, v in static.items() if k not in assigned | per_request}

    def visit_Name(self, node: nodes.Name) -> nodes.Node:
        value = self.static.get(node.name)
        if node.ctx == "load" and isinstance(value, _LITERALS):
            return nodes.Const(value, lineno=node.lineno)
        return node

    def visit_Getattr(self, node: nodes.Getattr) -> nodes.Node:
        return self._member(node, node.attr) or self.generic_visit(node)

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        key = node.arg.value if isinstance(node.arg, nodes.Const) else None
        return (self._member(node, key) if isinstance(key, str) else None) or self.generic_visit(node)

    def _member(self, node: nodes.Getattr | nodes.Getitem, key: str) -> nodes.Const | None:
        """`brand.name` / `brand["name"]` of a constant mapping; not a name dicts have as an
        attribute (`wording.items` is the method, to Jinja)."""
        target = node.node
        if not isinstance(target, nodes.Name) or target.ctx != "load":
            return None
        mapping = self.static.get(target.name)
        if not isinstance(mapping, Mapping) or hasattr(mapping, key):
            return None
        value = mapping.get(key)
        return nodes.Const(value, lineno=node.lineno) if isinstance(value, _LITERALS) else None
