"""The rewriting of a message's HTML for tracking: each http(s) link through relayd's click
route, an open pixel before ``</body>``. One pass of compiled regular expressions over the text
(no HTML parser: it runs once per message, in the API's compose thread and in the campaign
runner; see the README for its cost on a 20 KB newsletter)."""

from __future__ import annotations

import re
from html import unescape

from relayd.config import Tracking
from relayd.feedback.tokens import CLICK, OPEN, Tokens

# An <a ...> start tag; quoted attribute values may hold ">".
_ANCHOR = re.compile(r"""<[aA]\s(?:[^>"']+|"[^"]*"|'[^']*')*>""")
# Its href attribute (not data-href): double-quoted, single-quoted or bare.
_HREF = re.compile(r"""(?<=[\s"'])href\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)
# A link its author keeps out of tracking: data-notrack, or the class notrack.
_NOTRACK = re.compile(
    r"""\sdata-notrack\b|\sclass\s*=\s*(?:"[^"]*\bnotrack\b|'[^']*\bnotrack\b|notrack\b)""",
    re.IGNORECASE,
)
_WEB = re.compile(r"^https?://", re.IGNORECASE)
_BODY_END = re.compile(r"</body", re.IGNORECASE)


class Tracker:
    """Rewrites HTML for one config's tracking host; does nothing when tracking is off."""

    def __init__(self, config: Tracking, tokens: Tokens) -> None:
        self.config, self.tokens = config, tokens
        base = config.base_url
        self.opens = config.enabled and config.opens
        self.clicks = config.enabled and config.clicks
        self.click_base, self.pixel_base = f"{base}/c/", f"{base}/o/"
        # never rewritten: links that are tracking links already, the unsubscribe links
        self.untracked = (f"{base}/", *config.untracked)

    def rewrite(
        self, html: str, queue_id: str, rcpt: str, opens: bool = True, clicks: bool = True
    ) -> str:
        """``html`` with its http(s) links leading through the click route and an open pixel
        (each as the config and the caller allow). Untouched: mailto: and other schemes, the
        unsubscribe links, links marked ``data-notrack`` or ``class="notrack"``. The target is
        the href as the browser reads it (entities decoded); the rewritten href needs no
        escaping (base64url)."""
        opens, clicks = opens and self.opens, clicks and self.clicks
        if clicks:
            html = _ANCHOR.sub(lambda m: self._anchor(m.group(0), queue_id, rcpt), html)
        if opens:
            token = self.tokens.track(OPEN, queue_id, rcpt)
            pixel = (
                f'<img src="{self.pixel_base}{token}.gif" width="1" height="1" alt=""'
                ' style="display:block;width:1px;height:1px;border:0" />'
            )
            end = max(html.rfind("</body"), html.rfind("</BODY"))  # a string search: fast
            if end < 0 and (m := _BODY_END.search(html)):  # in another case (rare)
                end = m.start()
            html = f"{html[:end]}{pixel}{html[end:]}" if end >= 0 else html + pixel
        return html

    def _anchor(self, tag: str, queue_id: str, rcpt: str) -> str:
        m = _HREF.search(tag)
        if m is None or ("notrack" in tag.lower() and _NOTRACK.search(tag)):
            return tag
        quoted, single, bare = m.groups()
        url = quoted if quoted is not None else single if single is not None else bare
        url = (unescape(url) if "&" in url else url).strip()
        if not _WEB.match(url) or url.startswith(self.untracked):
            return tag
        token = self.tokens.track(CLICK, queue_id, rcpt, url)
        return f'{tag[: m.start()]}href="{self.click_base}{token}"{tag[m.end() :]}'
