"""html_to_text's fast paths read every document as the scanner before them did: same text, same links.

The reference is queueguard/html_text.py as it was before `_TAG` (names prefixed, bodies verbatim),
compared on every HTML part of the SpamAssassin dev split (fetched by ../shared/corpus/fetch-dev-corpus.sh:
without it this test fails, never skips), on generated markup and on the inputs of test_html_text.
"""

from __future__ import annotations

import html
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import spamassassin as sa
from queueguard import mime
from queueguard.html_text import html_to_text

# --- the reference: html_text before the fast paths -------------------------------------------------------

REF_BLOCK_TAGS = frozenset((
    "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol",
    "blockquote", "pre", "section", "article", "header", "footer",
))
REF_CELL_TAGS = frozenset(("td", "th"))
REF_HIDEABLE_TAGS = frozenset((
    "span", "div", "p", "font", "a", "b", "i", "u", "em", "strong", "small", "center", "section",
    "table", "tbody", "tr", "td", "th", "ul", "ol", "li", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6",
))
REF_HIDING = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|(?:font-size|opacity)\s*:\s*0+(?:\.0*)?(?![\d.])"
    r"|font-size\s*:\s*1px", re.IGNORECASE)
REF_COLLAPSED = re.compile(r"max-height\s*:\s*0+(?:px)?(?![\d.])", re.IGNORECASE)
REF_CLIPPED = re.compile(r"overflow\s*:\s*hidden", re.IGNORECASE)

REF_RAW_TEXT_TAGS = frozenset(("script", "style", "title"))

REF_NAME = re.compile(r"[a-zA-Z][^\s/>]*")
REF_SPACE = re.compile(r"[\s/]*")
REF_ATTR_NAME = re.compile(r"[^\s/>][^\s/>=]*")
REF_EQUALS = re.compile(r"\s*=\s*")
REF_UNQUOTED = re.compile(r"[^\s>]*")
REF_RAW_END = {tag: re.compile(rf"</{tag}[\s/>]", re.IGNORECASE) for tag in REF_RAW_TEXT_TAGS}
REF_OPEN_CLOSE = {tag: re.compile(rf"<(/?){tag}(?=[\s/>])", re.IGNORECASE) for tag in REF_HIDEABLE_TAGS}


def ref_hides(style: str) -> bool:
    """An inline style that hides its element's text from the reader: invisible words are
    hash-busting to the checks. (Not white text: on a dark background it is what the reader sees.)"""
    return bool(REF_HIDING.search(style) or (REF_COLLAPSED.search(style) and REF_CLIPPED.search(style)))


class RefScan:
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
        doc, pos, end = self.doc, 0, len(self.doc)
        while pos < end:
            lt = doc.find("<", pos)
            if lt < 0:
                self._text(doc[pos:])
                return
            if lt > pos:
                self._text(doc[pos:lt])
            pos = self._markup(lt)

    def _text(self, data: str) -> None:
        self.out.append(html.unescape(data) if "&" in data else data)

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
            name = REF_NAME.match(doc, lt + 2)
            if name is not None:
                self._break(name.group().lower())
            return self._after(self._find(">", lt + 2), 1)
        name = REF_NAME.match(doc, lt + 1)
        if name is None:  # a '<' that starts no tag is text
            self.out.append("<")
            return lt + 1
        return self._start_tag(name.group().lower(), name.end())

    def _after(self, found: int, length: int) -> int:
        """Past a construct's end marker, or the end of the input when it has none."""
        return len(self.doc) if found < 0 else found + length

    def _break(self, tag: str) -> None:
        """What a start or end tag adds to the text: a paragraph, a line, a space or nothing."""
        if tag in REF_BLOCK_TAGS:
            self.out.append("\n\n")
        elif tag in REF_CELL_TAGS:
            self.out.append(" ")
        elif tag == "br":
            self.out.append("\n")

    def _hidden_end(self, tag: str, pos: int) -> int | None:
        """Past the end tag matching a hidden element opened before `pos`; None if it has none."""
        if tag in self._unclosed:
            return None
        depth = 1
        for m in REF_OPEN_CLOSE[tag].finditer(self.doc, pos):
            depth += -1 if m.group(1) else 1
            if not depth:
                return self._after(self._find(">", m.end()), 1)
        self._unclosed.add(tag)  # shown after all: an unclosed hidden element must not blank the rest
        return None

    def _start_tag(self, tag: str, pos: int) -> int:
        doc, end = self.doc, len(self.doc)
        hidden = False
        while True:
            space = REF_SPACE.match(doc, pos)
            assert space is not None  # matches the empty string
            pos = space.end()
            if pos >= end:
                return end
            if doc[pos] == ">":
                pos += 1
                break
            name = REF_ATTR_NAME.match(doc, pos)
            assert name is not None  # doc[pos] is neither space, '/' nor '>'
            pos = name.end()
            eq = REF_EQUALS.match(doc, pos)
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
                unquoted = REF_UNQUOTED.match(doc, pos)
                assert unquoted is not None  # matches the empty string
                value, pos = unquoted.group(), unquoted.end()
            attribute = name.group().lower()
            if attribute in ("href", "src"):
                self._link(value)
            elif attribute == "hidden" or (attribute == "style" and ref_hides(value)):
                hidden = True
        if tag in REF_RAW_TEXT_TAGS and tag not in self._unclosed:
            close_tag = REF_RAW_END[tag].search(doc, pos)
            if close_tag is not None:
                return close_tag.start()
            self._unclosed.add(tag)  # read as text after all, like an unclosed hidden element
        if hidden and tag in REF_HIDEABLE_TAGS and (past := self._hidden_end(tag, pos)) is not None:
            return past
        self._break(tag)
        return pos

    def _link(self, value: str) -> None:
        url = html.unescape(value).strip()
        if url.lower().startswith(("http://", "https://")):
            self.links.append(url)


def ref_html_to_text(doc: str) -> tuple[str, list[str]]:
    """(text, links) of an HTML document or fragment; never raises."""
    scan = RefScan(doc)
    scan.run()
    return "".join(scan.out), scan.links


# --- the comparisons --------------------------------------------------------------------------------------


def assert_reads_as_the_reference(doc: str) -> None:
    assert html_to_text(doc) == ref_html_to_text(doc), doc[:300]


def html_parts(raw: bytes) -> list[str]:
    """The text/html parts of a message, decoded as mime._read_text decodes them for html_to_text."""
    docs = []
    for part in mime.email_message(raw)[1].walk():
        data = part.get_payload(decode=True)
        if part.get_content_type() == "text/html" and isinstance(data, bytes):
            limit = 200_000 * mime.HTML_INPUT_FACTOR  # parse_message's default max_text
            docs.append(mime.squeeze_bytes(data)[: limit * 4].decode(mime._charset(part, []), "replace")[:limit])
    return docs


def test_every_html_part_of_real_mail_reads_as_before() -> None:
    directory = sa.corpus_dir()
    docs = [doc for kind in ("spam", "ham") for m in sa.load(directory, kind) for doc in html_parts(m.raw)]
    assert len(docs) > 500
    for doc in docs:
        assert_reads_as_the_reference(doc)


def cased(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word, word.upper(), word.title(), word.swapcase() if len(word) > 1 else word])


TAG_NAMES = sorted(REF_BLOCK_TAGS | REF_CELL_TAGS | REF_HIDEABLE_TAGS | REF_RAW_TEXT_TAGS | {
    "br", "img", "head", "meta", "x", "a1", "o:p", "tbodyx", "scripts"})
tag_names = st.sampled_from(TAG_NAMES).flatmap(cased)
attribute_names = st.sampled_from([
    "href", "src", "hidden", "style", "class", "width", "srcset", "hrefx", "x", "=y", '"q', "'", "a\"b", "é",
]).flatmap(cased)
values = st.sampled_from([
    "https://x.example/a?b=1&amp;c=2", " http://y.example/ ", "HTTP://Z.example", "mailto:a@b.example", "",
    "display:none", "DISPLAY: none", "font-size:0", "font-size:0.5em", "opacity:0", "visibility:hidden",
    "max-height:0;overflow:hidden", "max-height:0", "a>b", "<", "<p>", "x y", "'", '"', "=", "/", "é数", "&#",
])
separators = st.sampled_from(["", " ", "  ", "/", " / ", "\n", "\t"])
attributes = st.tuples(separators, attribute_names, st.sampled_from(["", "=", " = ", "= "]),
                       st.sampled_from(['"', "'", "", '"', "'"]), values, st.booleans()).map(
    lambda a: a[0] + a[1] + (a[2] + a[3] + a[4] + (a[3] if a[5] else "") if a[2] else ""))
start_tags = st.tuples(tag_names, st.lists(attributes, max_size=4), separators,
                       st.sampled_from([">", "/>", " >", ""])).map(lambda t: f"<{t[0]}{''.join(t[1])}{t[2]}{t[3]}")
end_tags = st.tuples(tag_names, st.sampled_from(["", " ", " x=1", "<", "'", "/"]), st.sampled_from([">", ""])).map(
    lambda t: f"</{t[0]}{t[1]}{t[2]}")
pieces = st.sampled_from([
    "text", "Buy now", " ", "\n", "é", "数字", "&amp;", "&eacute;", "&#x41;", "&#65", "&", "&nbsp;x", "<", ">",
    "<3", "< p", "</", "</ >", "<!--", "-->", "<!---->", "<!-->", "<!--->", "<!-- c -->", "<!DOCTYPE html>",
    "<![CDATA[x]]>", "<?xml x?>", "<!", "<?", "'", '"', "=", "</script >", "</STYLE>", "</title", "</span>",
])
documents = st.lists(st.one_of(start_tags, end_tags, pieces), max_size=30).map("".join)


@settings(max_examples=1500, deadline=None, database=None)
@given(documents)
def test_generated_markup_reads_as_before(doc: str) -> None:
    assert_reads_as_the_reference(doc)


HOSTILE_UNITS = ["<!--", "<a b='", '<a b="', "<a ", "</", "<!", "<?", "<a b=", "&#", "<p x='>'", "<a href='x'>",
                 '<span style="display:none">x', "<script>", "<x y=\"<\">", "<a b=c"]
INPUTS = [
    "<html><head><title>Hidden</title><style>p{color:red}</style></head><body>"
    "<p>Caf&eacute; &amp; <b>bar</b></p><div>two<br/>lines</div>"
    "<a HREF='https://x.example/a?b=1&amp;c=2'>here</a><img src=http://img.example/p.gif>"
    "<a href=\"mailto:x@y.example\">mail</a><script>document.write('no')</script></body></html>",
    "a < b and 3<4, <!DOCTYPE html><?xml x?><!-- c -->d<!---->e<!-->f</ >g",
    "<head>Buy now</head>", "<head><meta x=1>Buy now <p>cheap", "<!--#rotate>Terrific offer <b>now</b>",
    "<p title='x>Visible text</p> more", "<a href=\"https://x.example/>click</a> after",
    "<title>Title</title><title>Buy now", "<script>var a = '<p>not text</p>'; before</script>after",
    "<table><tr><td>Buy cheap</td><td>watches today</td></tr></table>", "<td>a</td><th>b</th>",
    '<span style="font-size:0.9em">small</span>', '<span style="opacity:0.5">faint</span>',
    '<div style="max-height:0">spills out</div>', '<span style="color:#ffffff">white on a dark cell</span>',
    '<div style="display:none">Buy <b>now</b> today',
    *(f"Buy now {hider}salad words <{tag}>nested</{tag}> more</{tag}> today" for hider, tag in [
        ('<span style="display:none">', "span"), ("<span style='DISPLAY: none !important'>", "span"),
        ('<div style="visibility:hidden">', "div"), ('<font style="font-size:1px">', "font"),
        ("<span hidden>", "span"), ("<div hidden='hidden'>", "div"),
        ('<div style="overflow: hidden; max-height: 0px">', "div")]),
    *(unit * (20_000 // len(unit)) + "<p>tail text</p>" for unit in HOSTILE_UNITS),
]


@pytest.mark.parametrize("doc", INPUTS)
def test_the_inputs_of_test_html_text_read_as_before(doc: str) -> None:
    assert_reads_as_the_reference(doc)

