"""Templates: the spec's subjects and plain texts word for word, branded HTML, start-up checks."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.config import Settings
from gateway.errors import StartupError
from gateway.renderer import Renderer
from tests.support import SAMPLE_CALL, SPEC

GOLDEN = Path(__file__).parent / "golden"
WHEN = datetime(2025, 11, 7, 14, 30, tzinfo=ZoneInfo("Asia/Bangkok"))

UC2 = {
    "ticket_id": "TKT-2025-001234",
    "customer_id": "CUST-001",
    "customer_email": "customer@example.com",
    "query": "What is the interest rate for mortgage loans?",
    "reason": "Out of scope - Mortgages not in knowledge base",
}
UC3 = {
    **UC2,
    "ticket_id": "TKT-2025-001235",
    "query": "I need help with complex financial planning across multiple areas...",
    "reason": "Complex multi-topic requiring human advisor",
}

CASES = [
    ("uc2_customer", "UC2", "customer", UC2),
    ("uc3_customer", "UC3", "customer", UC3),
    ("uc2_bank_team", "UC2", "bank_team", UC2),
]


@pytest.fixture
def renderer(settings_factory: Callable[..., Settings]) -> Renderer:
    return Renderer(settings_factory())


def golden(name: str, kind: str) -> str:
    return (GOLDEN / f"{name}.{kind}").read_text()


def test_golden_files_are_the_spec_texts_word_for_word() -> None:
    if not SPEC.exists():
        pytest.skip(f"the spec is not beside the repository ({SPEC})")
    spec = SPEC.read_text()
    blocks = re.findall(r"\*\*Plain Text\*\*:\n```\n(.*?)```", spec, re.S)
    subjects = [s.strip() for s in re.findall(r"\*\*Subject\*\*: (.*)", spec)]
    assert blocks == [golden(name, "txt") for name, *_ in CASES]
    assert subjects == [golden(name, "subject").strip() for name, *_ in CASES]


@pytest.mark.parametrize(("name", "use_case", "role", "request_"), CASES, ids=[c[0] for c in CASES])
def test_subject_and_plain_text_equal_the_spec(
    renderer: Renderer, name: str, use_case: str, role: str, request_: dict[str, str]
) -> None:
    email = renderer.render(use_case, role, request_, WHEN)
    assert email.subject == golden(name, "subject").strip()
    assert email.text == golden(name, "txt")


def test_uc3_team_email_names_the_money_coach_use_case(renderer: Renderer) -> None:
    email = renderer.render("UC3", "bank_team", UC3, WHEN)
    assert email.subject == "New Support Ticket: TKT-2025-001235 (UC3)"
    assert "Use Case: UC3 - AI Money Coach\n" in email.text


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> _Collector:
    collector = _Collector()
    collector.feed(html)
    return collector


def test_customer_html_is_branded_and_links_to_the_tracking_page(renderer: Renderer) -> None:
    html = renderer.render("UC2", "customer", UC2, WHEN).html
    page = parse(html)
    assert "#0b3d91" in html  # brand.primary_color from config.yaml
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert any(a.get("src", "").endswith("logo-white.png") for a in images)
    hrefs = {attrs.get("href") for tag, attrs in page.tags if tag == "a"}
    assert "https://bankx.com/support/tickets/TKT-2025-001234" in hrefs
    assert "TKT-2025-001234" in "".join(page.text)


def test_team_html_is_a_table_with_priority_and_action_buttons(renderer: Renderer) -> None:
    html = renderer.render("UC3", "bank_team", UC3, WHEN).html
    page = parse(html)
    text = " ".join(" ".join(page.text).split())
    assert "Priority: High" in text  # UC3 is configured with priority: high
    cells = [t.strip() for t in page.text if t.strip()]
    for label, value in [
        ("Customer ID", "CUST-001"),
        ("Reason", UC3["reason"]),
        ("Use Case", "UC3 - AI Money Coach"),
    ]:
        assert label in cells and value in cells
    hrefs = {attrs.get("href") for tag, attrs in page.tags if tag == "a"}
    assert "https://bankx.com/admin/tickets/TKT-2025-001235" in hrefs
    assert "https://bankx.com/support/tickets/TKT-2025-001235" in hrefs
    assert "Open ticket dashboard" in text


def test_hostile_query_is_escaped_in_html_and_kept_verbatim_in_text(renderer: Renderer) -> None:
    hostile = '<script>alert("x")</script>\n<img src=x onerror=alert(1)> & "quotes"'
    email = renderer.render("UC2", "customer", {**UC2, "query": hostile}, WHEN)
    assert hostile in email.text
    assert "<script>" not in email.html and "<img src=x" not in email.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;<br>" in email.html
    page = parse(email.html)
    assert not [t for t, _ in page.tags if t == "script"]
    assert not [a for _, a in page.tags if any(k.startswith("on") for k in a)]


def test_line_breaks_in_query_show_as_br_in_html(renderer: Renderer) -> None:
    email = renderer.render("UC2", "bank_team", {**UC2, "query": "line one\nline two"}, WHEN)
    assert "line one<br>\nline two" in email.html
    assert "Customer Query:\nline one\nline two\n" in email.text


def test_link_values_are_url_encoded(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(
        {
            "validation": {"ticket_id_pattern": r"^.{1,64}$"},
            "links": {"tracking_url": "https://bankx.com/t?id={ticket_id}&c={customer_id}"},
        }
    )
    email = Renderer(settings).render("UC2", "customer", {**UC2, "ticket_id": "A&B/../x y"}, WHEN)
    assert "https://bankx.com/t?id=A%26B%2F..%2Fx%20y&c=CUST-001" in email.text


def test_missing_template_variable_stops_startup_naming_template_and_variable(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    body = settings.base_dir / "templates" / "customer" / "body.txt.j2"
    body.write_text(body.read_text() + "\n{{ wording.closing_line }} {{ agent_name }}\n")
    with pytest.raises(StartupError) as caught:
        Renderer(settings)
    assert "templates/customer/body.txt.j2" in str(caught.value)
    assert "missing template variable(s) agent_name" in str(caught.value)  # the spec's words


def test_the_specs_timestamp_variable_is_the_creation_time(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory()
    body = settings.base_dir / "templates" / "customer" / "body.txt.j2"
    body.write_text(body.read_text() + "\nCreated {{ timestamp }} ({{ created_at }})\n")
    created = datetime(2025, 11, 7, 14, 30, tzinfo=settings.zone)
    email = Renderer(settings).render("UC2", "customer", SAMPLE_CALL, created)
    assert "Created 2025-11-07 14:30 +07 (2025-11-07 14:30 +07)" in email.text


def test_variable_in_an_untaken_branch_is_still_checked(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory()
    subject = settings.base_dir / "templates" / "bank_team" / "subject.txt.j2"
    subject.write_text("{% if false %}{{ nonexistent }}{% endif %}New Support Ticket: {{ ticket_id }}\n")
    with pytest.raises(StartupError, match="nonexistent"):
        Renderer(settings)


def test_missing_wording_key_is_found_at_startup(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory({"use_cases": {"UC4": {"title": "Cards", "customer": {"wording": {}}}}})
    with pytest.raises(StartupError, match="UC4 customer"):
        Renderer(settings)


def test_unknown_mjml_tag_stops_startup(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory()
    mjml = settings.base_dir / "templates" / "customer" / "body.mjml"
    mjml.write_text(
        mjml.read_text()
        .replace("<mj-text>Dear", "<mj-texxt>Dear")
        .replace("Dear Valued Customer,</mj-text>", "Dear Valued Customer,</mj-texxt>")
    )
    with pytest.raises(StartupError, match="mj-texxt"):
        Renderer(settings)


def test_missing_template_file_names_the_config_key(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(
        {
            "use_cases": {
                "UC4": {
                    "title": "Cards",
                    "customer": {
                        "templates": {
                            "subject": "templates/uc4/subject.j2",
                            "text": "templates/uc4/body.j2",
                            "html": "templates/uc4/body.mjml",
                        }
                    },
                }
            }
        }
    )
    with pytest.raises(StartupError, match=r"use_cases\.UC4\.customer\.templates\.subject"):
        Renderer(settings)


def test_constants_compiled_into_the_templates_render_exactly_as_plain_jinja(
    settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Brand, wording and use case values are made literals at start-up (escaped once then):
    every email must come out as rendering them as variables would, special characters too."""
    settings = settings_factory(
        {
            "brand": {"name": 'A&B <Bank> "Q"', "font_family": "'Inter', <sans>"},
            "use_cases": {"UC2": {"title": "Q&A"}},
        }
    )
    folded = Renderer(settings)
    monkeypatch.setattr("gateway.renderer._FoldStatic.visit", lambda self, tree: tree)
    plain = Renderer(settings)
    assert "A&amp;B &lt;Bank&gt; &#34;Q&#34;" in folded.render("UC2", "customer", UC2, WHEN).html
    for use_case in settings.use_cases:
        for role in ("customer", "bank_team"):
            assert folded.render(use_case, role, UC2, WHEN) == plain.render(use_case, role, UC2, WHEN)


def test_a_template_that_assigns_a_constant_name_keeps_its_own_value(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory()
    subject = settings.base_dir / "templates" / "customer" / "subject.txt.j2"
    subject.write_text(
        '{% set brand = {"name": "Own"} %}{% for use_case in ["Loop"] %}{{ use_case }}{% endfor %} '
        "{{ brand.name }} {{ wording.items is defined }}: {{ ticket_id }}\n"
    )
    email = Renderer(settings).render("UC2", "customer", UC2, WHEN)
    assert email.subject == "Loop Own True: TKT-2025-001234"
