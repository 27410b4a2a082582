"""HTML to plain text and links, in time linear in the input.

Why not html.parser: it rescans unclosed comments and tags from their start on every feed, so
100 KB of `<a b='` or `<!--` took 20-100 s on the event loop every session shares (one message
from anyone froze the proxy). This scanner looks at each character a bounded number of times:
each search for the end of a construct starts where the last one stopped, and a marker found
missing once is not looked for again.

What it keeps: text between tags (character references decoded), a paragraph break for block
elements, a line break for <br> and a space between table cells, and the http(s) targets of href
and src attributes. What it drops: comments, declarations, processing instructions, the content
of <script>, <style> and <title>, and of elements hidden by an inline style (`hides`) or the
`hidden` attribute, up to their end tag. Stray text in <head> is kept, as browsers show it.
An unclosed comment is just its `<!--` and an unclosed quote ends its tag at the next `>`, as
html.parser had it: the text after them still counts (a spammer cannot blank the body for the
checks with one `<!--`, and real spam has such markup: `<!--#rotate>`); so does the content of an
element that would be skipped but never ends.
"""

from __future__ import annotations

import html
import re

BLOCK_TAGS = frozenset((
    "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol",
    "blockquote", "pre", "section", "article", "header", "footer",
))
CELL_TAGS = frozenset(("td", "th"))
"""A space, not a break: a row of cells reads as one line, and spammers cut sentences into
cells at random places per copy to break them."""
HIDEABLE_TAGS = frozenset((
    "span", "div", "p", "font", "a", "b", "i", "u", "em", "strong", "small", "center", "section",
    "table", "tbody", "tr", "td", "th", "ul", "ol", "li", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6",
))
"""Elements whose content is dropped when an inline style or `hidden` hides it (a fixed set: an
unclosed one is searched to the end once per name, which keeps the scan linear)."""
_HIDING = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|(?:font-size|opacity)\s*:\s*0+(?:\.0*)?(?![\d.])"
    r"|font-size\s*:\s*1px", re.IGNORECASE)
_COLLAPSED = re.compile(r"max-height\s*:\s*0+(?:px)?(?![\d.])", re.IGNORECASE)
_CLIPPED = re.compile(r"overflow\s*:\s*hidden", re.IGNORECASE)

RAW_TEXT_TAGS = frozenset(("script", "style", "title"))
"""Elements whose content is not markup and not shown: skipped up to their end tag."""

_NAME = re.compile(r"[a-zA-Z][^\s/>]*")
_SPACE = re.compile(r"[\s/]*")
_ATTR_NAME = re.compile(r"[^\s/>][^\s/>=]*")
_EQUALS = re.compile(r"\s*=\s*")
_UNQUOTED = re.compile(r"[^\s>]*")
_RAW_END = {tag: re.compile(rf"</{tag}[\s/>]", re.IGNORECASE) for tag in RAW_TEXT_TAGS}
_OPEN_CLOSE = {tag: re.compile(rf"<(/?){tag}(?=[\s/>])", re.IGNORECASE) for tag in HIDEABLE_TAGS}
_BREAKS = {tag: "\n\n" for tag in BLOCK_TAGS} | {tag: " " for tag in CELL_TAGS} | {"br": "\n"}
"""What a start or end tag adds to the text: a paragraph, a space between cells or a line."""
_TAG = re.compile(
    r"<(?:/([a-zA-Z][^\s/<>]*+)[^<>]*+"
    r"|([a-zA-Z][^\s/<>]*+)"
    r"(?:[\s/]*+(?:(?=(?i:href|src|hidden|style))())?[^\s/<>][^\s/<>=]*+"
    r"""(?:\s*+=\s*+(?:"[^"<>]*+"|'[^'<>]*+'|[^\s<>"'][^\s<>]*+|(?=>))|(?!\s*+=)))*+"""
    r"[\s/]*+)>")
"""An end tag, or a start tag whose quotes all close, read as `_markup` reads it, in one match; group
3 is set when an attribute may be one `_start_tag` acts on. Nothing in it may be '<' or '>', so an
attempt reads no further than the next of them, which `_markup` reads past too: still linear."""
_ATTRIBUTE = re.compile(r"""[\s/]*+([^\s/>][^\s/>=]*+)(?:\s*+=\s*+("[^"]*+"|'[^']*+'|[^\s>]*+))?""")
"""One attribute of a start tag `_TAG` matched: its name and value (quotes included)."""


def hides(style: str) -> bool:
    """An inline style that hides its element's text from the reader: invisible words are
    hash-busting to the checks. (Not white text: on a dark background it is what the reader sees.)"""
    return bool(_HIDING.search(style) or (_COLLAPSED.search(style) and _CLIPPED.search(style)))


class _Scan:
    """One pass over one document; `out` and `links` are the result."""

    def __init__(self, doc: str) -> None:
        self.doc = doc
        self.out: list[str] = []
        self.links: list[str] = []
        self._absent: dict[str, int] = {}
        """marker -> a position from which it does not occur (searched to the end once)."""
        self._unclosed: set[str] = set()
        """Raw-text and hideable tags one of which was found without its end: not skipped again."""

    def _find(self, marker: str, pos: int) -> int:
        """doc.find, but a marker missing from some position on is not searched for again."""
        if pos >= self._absent.get(marker, len(self.doc) + 1):
            return -1
        found = self.doc.find(marker, pos)
        if found < 0:
            self._absent[marker] = pos
        return found

    def run(self) -> None:
        """Text and the common tags inline, one `_TAG` match a tag; the rest by `_markup`. The
        general path alone made 2.4 times the Python-level calls and took 1.4-1.5 times as long
        (540 µs a SpamAssassin HTML part, 360-400 µs this way; 19 ms and 15 ms for 200 KB of tables)."""
        doc, pos, end = self.doc, 0, len(self.doc)
        out, find, tag_at, breaks, unescape = self.out, doc.find, _TAG.match, _BREAKS.get, html.unescape
        while pos < end:
            lt = find("<", pos)
            if lt < 0:
                text = doc[pos:]
                out.append(unescape(text) if "&" in text else text)
                return
            if lt > pos:
                text = doc[pos:lt]
                out.append(unescape(text) if "&" in text else text)
            m = tag_at(doc, lt)
            if m is None:
                pos = self._markup(lt)
                continue
            closing, opening, notable = m.groups()
            pos = m.end()
            if closing is not None:
                tag = closing.lower()
            else:
                tag = opening.lower()
                hidden = notable is not None and self._attributes(m.end(2), pos - 1)
                if hidden or tag in RAW_TEXT_TAGS:
                    pos = self._content(tag, pos, hidden)
                    continue
            brk = breaks(tag)
            if brk is not None:
                out.append(brk)

    def _markup(self, lt: int) -> int:
        """What starts at `lt` (a '<'); the position after it."""
        doc = self.doc
        nxt = doc[lt + 1:lt + 2]
        if nxt == "!":
            if doc.startswith("<!--", lt):
                for empty in ("<!-->", "<!--->"):
                    if doc.startswith(empty, lt):
                        return lt + len(empty)
                close = self._find("-->", lt + 4)
                return lt + 4 if close < 0 else close + 3  # unclosed: only the marker goes
            return self._after(self._find(">", lt + 2), 1)  # <!DOCTYPE ...>, <![CDATA[ ...>
        if nxt == "?":
            return self._after(self._find(">", lt + 2), 1)
        if nxt == "/":
            name = _NAME.match(doc, lt + 2)
            if name is not None:
                self._break(name.group().lower())
            return self._after(self._find(">", lt + 2), 1)
        name = _NAME.match(doc, lt + 1)
        if name is None:  # a '<' that starts no tag is text
            self.out.append("<")
            return lt + 1
        return self._start_tag(name.group().lower(), name.end())

    def _after(self, found: int, length: int) -> int:
        """Past a construct's end marker, or the end of the input when it has none."""
        return len(self.doc) if found < 0 else found + length

    def _break(self, tag: str) -> None:
        """What a start or end tag adds to the text: a paragraph, a line, a space or nothing."""
        brk = _BREAKS.get(tag)
        if brk is not None:
            self.out.append(brk)

    def _hidden_end(self, tag: str, pos: int) -> int | None:
        """Past the end tag matching a hidden element opened before `pos`; None if it has none."""
        if tag in self._unclosed:
            return None
        depth = 1
        for m in _OPEN_CLOSE[tag].finditer(self.doc, pos):
            depth += -1 if m.group(1) else 1
            if not depth:
                return self._after(self._find(">", m.end()), 1)
        self._unclosed.add(tag)  # shown after all: an unclosed hidden element must not blank the rest
        return None

    def _start_tag(self, tag: str, pos: int) -> int:
        doc, end = self.doc, len(self.doc)
        hidden = False
        while True:
            space = _SPACE.match(doc, pos)
            assert space is not None  # matches the empty string
            pos = space.end()
            if pos >= end:
                return end
            if doc[pos] == ">":
                pos += 1
                break
            name = _ATTR_NAME.match(doc, pos)
            assert name is not None  # doc[pos] is neither space, '/' nor '>'
            pos = name.end()
            eq = _EQUALS.match(doc, pos)
            if eq is None:
                hidden = hidden or name.group().lower() == "hidden"
                continue
            pos = eq.end()
            quote = doc[pos:pos + 1]
            if quote in ('"', "'"):
                close = self._find(quote, pos + 1)
                if close < 0:  # a quote that never ends: the tag ends at the next '>'
                    pos = self._after(self._find(">", pos + 1), 1)
                    break
                value, pos = doc[pos + 1:close], close + 1
            else:
                unquoted = _UNQUOTED.match(doc, pos)
                assert unquoted is not None  # matches the empty string
                value, pos = unquoted.group(), unquoted.end()
            hidden = self._attribute(name.group().lower(), value) or hidden
        return self._content(tag, pos, hidden)

    def _attributes(self, pos: int, stop: int) -> bool:
        """Links of the attributes of a start tag `_TAG` matched (`pos` to `stop`); whether one hides it."""
        hidden = False
        for name, value in map(re.Match.groups, _ATTRIBUTE.finditer(self.doc, pos, stop)):
            if value is None:
                hidden = hidden or name.lower() == "hidden"
            else:
                hidden = self._attribute(name.lower(), value[1:-1] if value[:1] in ('"', "'") else value) or hidden
        return hidden

    def _attribute(self, attribute: str, value: str) -> bool:
        """Takes a link; whether the attribute hides its element."""
        if attribute in ("href", "src"):
            self._link(value)
            return False
        return attribute == "hidden" or (attribute == "style" and hides(value))

    def _content(self, tag: str, pos: int, hidden: bool) -> int:
        """After a start tag ending at `pos`: past the content skipped, or what the tag adds to the text."""
        doc = self.doc
        if tag in RAW_TEXT_TAGS and tag not in self._unclosed:
            close_tag = _RAW_END[tag].search(doc, pos)
            if close_tag is not None:
                return close_tag.start()
            self._unclosed.add(tag)  # read as text after all, like an unclosed hidden element
        if hidden and tag in HIDEABLE_TAGS and (past := self._hidden_end(tag, pos)) is not None:
            return past
        self._break(tag)
        return pos

    def _link(self, value: str) -> None:
        url = html.unescape(value).strip()
        if url.lower().startswith(("http://", "https://")):
            self.links.append(url)


def html_to_text(doc: str) -> tuple[str, list[str]]:
    """(text, links) of an HTML document or fragment; never raises."""
    scan = _Scan(doc)
    scan.run()
    return "".join(scan.out), scan.links
