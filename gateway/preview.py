"""`escalation-comms preview`: every use case's emails rendered with sample data, as a gallery.

index.html shows each email's HTML in a 600 px (desktop) and a 375 px (mobile)
frame beside its plain text, so a template change can be reviewed in a browser.
"""

from __future__ import annotations

from datetime import datetime
from html import escape
from pathlib import Path

from gateway.renderer import ROLES, SAMPLE_REQUEST, Renderer

ROLE_TITLES = {"customer": "Customer confirmation", "bank_team": "Support team notice"}
FRAMES = (("Desktop", 600), ("Mobile", 375))

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>EscalationComms email preview</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 24px; background: #eef1f6; color: #1f2933; }}
 h1 {{ font-size: 22px; }} h2 {{ margin-top: 40px; border-bottom: 2px solid #cbd2d9; }}
 .email {{ background: #fff; border-radius: 8px; padding: 16px; margin: 16px 0; }}
 .subject {{ font-weight: bold; margin: 4px 0 12px; }}
 .views {{ display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }}
 figure {{ margin: 0; }} figcaption {{ font-size: 12px; color: #52606d; margin-bottom: 4px; }}
 iframe {{ border: 1px solid #cbd2d9; background: #fff; height: 900px; }}
 pre {{ white-space: pre-wrap; width: 420px; margin: 0; padding: 12px; background: #f5f7fa;
        border: 1px solid #cbd2d9; font-size: 13px; }}
</style></head><body>
<h1>EscalationComms email preview</h1>
<p>Rendered {generated} with sample data (ticket {ticket}).</p>
{sections}
</body></html>
"""


def write_gallery(renderer: Renderer, out_dir: Path, use_cases: list[str] | None = None) -> Path:
    """Write one HTML and one text file per email plus index.html; return the index path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(renderer.settings.zone)
    sections = []
    for use_case in use_cases or list(renderer.settings.use_cases):
        title = renderer.settings.use_cases[use_case].title
        blocks = [f'<h2 id="{use_case}">{escape(use_case)} — {escape(title)}</h2>']
        for role in ROLES:
            email = renderer.render(use_case, role, SAMPLE_REQUEST, now)
            stem = f"{use_case}-{role}"
            (out_dir / f"{stem}.html").write_text(email.html, encoding="utf-8")
            (out_dir / f"{stem}.txt").write_text(email.text, encoding="utf-8")
            frames = "".join(
                f"<figure><figcaption>{label} ({width} px)</figcaption>"
                f'<iframe class="frame-{width}" title="{stem} {label}" src="{stem}.html" '
                f'width="{width}"></iframe></figure>'
                for label, width in FRAMES
            )
            blocks.append(
                f'<section class="email" id="{stem}"><div>{ROLE_TITLES[role]}</div>'
                f'<div class="subject">Subject: {escape(email.subject)}</div>'
                f'<div class="views">{frames}<figure><figcaption>Plain text</figcaption>'
                f"<pre>{escape(email.text)}</pre></figure></div></section>"
            )
        sections.append("\n".join(blocks))
    index = out_dir / "index.html"
    index.write_text(
        PAGE.format(
            generated=now.strftime("%Y-%m-%d %H:%M %Z"),
            ticket=SAMPLE_REQUEST["ticket_id"],
            sections="\n".join(sections),
        ),
        encoding="utf-8",
    )
    return index
