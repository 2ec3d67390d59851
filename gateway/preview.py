"""`escalation-comms preview`: every use case's emails rendered with sample data, as a gallery.

index.html shows each email's HTML in a 600 px (desktop) and a 375 px (mobile)
frame beside its plain text, so a template change can be reviewed in a browser.
Each email is rendered twice: with the spec's sample request, and with awkward
input (a long unbroken URL, several lines, non-Latin script) that shows whether
the layout holds on a phone.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from pathlib import Path

from gateway.renderer import ROLES, SAMPLE_REQUEST, Renderer

ROLE_TITLES = {"customer": "Customer confirmation", "bank_team": "Support team notice"}
FRAMES = (("Desktop", 600), ("Mobile", 375))

#: input that stresses a layout: unbroken tokens wider than a phone, line breaks, Thai, escaping
LONG_REQUEST = {
    "ticket_id": "TKT-2025-001235",
    "customer_id": "CUST-0000000000000000000000000042",
    "customer_email": "customer@example.com",
    "query": (
        "I read https://bankx.com/products/mortgages/fixed-rate/30-years?utm_source=chatbot&"
        "utm_medium=uc2&session=0123456789abcdefghijklmnopqrstuvwxyz and it says <5% & no fees.\n"
        "Does that apply to me?\r\nอัตราดอกเบี้ยเงินกู้บ้านเท่าไหร่ครับ"
    ),
    "reason": "Out of scope - Mortgages_not_in_knowledge_base_and_confidence_below_threshold_0.12",
}

#: (file-name suffix, caption, request)
SAMPLES = (("", "Sample request", SAMPLE_REQUEST), ("-long", "Long, multi-line input", LONG_REQUEST))

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>EscalationComms email preview</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 24px; background: #eef1f6; color: #1f2933; }}
 h1 {{ font-size: 22px; }} h2 {{ margin-top: 40px; border-bottom: 2px solid #cbd2d9; }}
 nav a {{ margin-right: 12px; }}
 .email {{ background: #fff; border-radius: 8px; padding: 16px; margin: 16px 0; }}
 .sample {{ font-size: 12px; color: #52606d; }}
 .subject {{ font-weight: bold; margin: 4px 0 12px; }}
 .views {{ display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }}
 figure {{ margin: 0; }} figcaption {{ font-size: 12px; color: #52606d; margin-bottom: 4px; }}
 iframe {{ border: 1px solid #cbd2d9; background: #fff; height: 900px; }}
 figure.text {{ flex: 1 1 300px; min-width: 300px; max-width: 560px; }}
 pre {{ white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; padding: 12px;
        background: #f5f7fa; border: 1px solid #cbd2d9; font-size: 13px; }}
</style></head><body>
<h1>EscalationComms email preview</h1>
<p>Rendered {generated} with sample data. Open an email on its own:
each HTML file is linked from its caption.</p>
<nav>{nav}</nav>
{sections}
</body></html>
"""


def write_gallery(renderer: Renderer, out_dir: Path, use_cases: list[str] | None = None) -> Path:
    """Write one HTML and one text file per email plus index.html; return the index path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(renderer.settings.zone)
    chosen = use_cases or list(renderer.settings.use_cases)
    sections = []
    for use_case in chosen:
        title = renderer.settings.use_cases[use_case].title
        blocks = [f'<h2 id="{escape(use_case)}">{escape(use_case)} — {escape(title)}</h2>']
        for role in ROLES:
            for suffix, caption, request in SAMPLES:
                email = renderer.render(use_case, role, request, now)
                stem = f"{use_case}-{role}{suffix}"
                (out_dir / f"{stem}.html").write_text(email.html, encoding="utf-8")
                (out_dir / f"{stem}.txt").write_text(email.text, encoding="utf-8")
                blocks.append(
                    _email_block(stem, role, caption, request["ticket_id"], email.subject, email.text)
                )
        sections.append("\n".join(blocks))
    nav = " ".join(f'<a href="#{escape(u)}">{escape(u)}</a>' for u in chosen)
    index = out_dir / "index.html"
    index.write_text(
        PAGE.format(generated=now.strftime("%Y-%m-%d %H:%M %Z"), nav=nav, sections="\n".join(sections)),
        encoding="utf-8",
    )
    return index


def _email_block(stem: str, role: str, caption: str, ticket_id: str, subject: str, text: str) -> str:
    frames = "".join(
        f'<figure><figcaption><a href="{stem}.html">{label} ({width} px)</a></figcaption>'
        f'<iframe class="frame-{width}" title="{stem} {label}" src="{stem}.html" '
        f'width="{width}"></iframe></figure>'
        for label, width in FRAMES
    )
    return (
        f'<section class="email" id="{stem}" data-html="{stem}.html" data-ticket="{escape(ticket_id)}">'
        f'<div>{ROLE_TITLES[role]} <span class="sample">· {escape(caption)}</span></div>'
        f'<div class="subject">Subject: {escape(subject)}</div>'
        f'<div class="views">{frames}<figure class="text">'
        f'<figcaption><a href="{stem}.txt">Plain text</a></figcaption>'
        f"<pre>{escape(text)}</pre></figure></div></section>"
    )
