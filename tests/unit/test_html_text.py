"""html_text: what a reader sees, links, and hostile markup read in one pass."""

from __future__ import annotations

import pytest

from queueguard.html_text import html_to_text


def test_text_breaks_links_and_entities() -> None:
    text, links = html_to_text(
        "<html><head><title>Hidden</title><style>p{color:red}</style></head><body>"
        "<p>Caf&eacute; &amp; <b>bar</b></p><div>two<br/>lines</div>"
        "<a HREF='https://x.example/a?b=1&amp;c=2'>here</a><img src=http://img.example/p.gif>"
        "<a href=\"mailto:x@y.example\">mail</a><script>document.write('no')</script></body></html>")
    assert text == "\n\nCafé & bar\n\n\n\ntwo\nlines\n\nheremail"
    assert links == ["https://x.example/a?b=1&c=2", "http://img.example/p.gif"]


def test_markup_that_is_not_markup() -> None:
    text, _ = html_to_text("a < b and 3<4, <!DOCTYPE html><?xml x?><!-- c -->d<!---->e<!-->f</ >g")
    assert text == "a < b and 3<4, defg"


def test_stray_text_in_head_is_shown_as_browsers_do() -> None:
    assert html_to_text("<head>Buy now</head>")[0] == "Buy now"
    assert html_to_text("<head><meta x=1>Buy now <p>cheap")[0] == "Buy now \n\ncheap"


def test_unclosed_constructs_do_not_blank_the_rest() -> None:
    """A spammer's `<!--`, stray quote or unclosed <title> must not hide the body from the checks
    (real spam has `<!--#rotate>` with no end)."""
    assert html_to_text("<!--#rotate>Terrific offer <b>now</b>")[0] == "#rotate>Terrific offer now"
    assert html_to_text("<p title='x>Visible text</p> more")[0] == "\n\nVisible text\n\n more"
    assert html_to_text("<a href=\"https://x.example/>click</a> after")[0] == "click after"
    assert html_to_text("<title>Title</title><title>Buy now")[0] == "Buy now"
    assert html_to_text("<script>var a = '<p>not text</p>'; before</script>after")[0] == "after"


class Counted(str):
    """A document that counts the characters its find() calls look at."""

    looked = 0

    def find(self, sub: str, start: int | None = 0, end: int | None = None) -> int:  # type: ignore[override]
        found = super().find(sub, start, end)
        Counted.looked += (found if found >= 0 else len(self)) - (start or 0)
        return found


@pytest.mark.parametrize("unit", ["<!--", "<a b='", '<a b="', "<a ", "</", "<!", "<?", "<a b=", "&#", "<p x='>'"])
def test_hostile_repetition_is_read_in_one_pass(unit: str) -> None:
    """html.parser rescanned these from their start on every feed: quadratic, 20-100 s for 100-500
    KB on the event loop. Counted, not timed: the searches look at each character a few times."""
    doc = Counted(unit * (200_000 // len(unit)) + "<p>tail text</p>")
    Counted.looked = 0
    text, _ = html_to_text(doc)
    assert Counted.looked <= 3 * len(doc), (unit, Counted.looked)
    assert "tail text" in text or unit.startswith("<a b=")  # an attribute value swallows it


def test_an_unclosed_script_is_searched_once() -> None:
    """Searched to the end once, not once per tag (50,000 x 400 KB would not finish)."""
    doc = "<script>" * 50_000 + "<p>tail</p>"
    assert html_to_text(doc)[0] == "\n\ntail\n\n"


def test_table_cells_read_as_one_line() -> None:
    """Spammers cut sentences into cells at random places per copy."""
    assert html_to_text("<table><tr><td>Buy cheap</td><td>watches today</td></tr></table>")[0].split() == \
        ["Buy", "cheap", "watches", "today"]
    assert "\n\n" not in html_to_text("<td>a</td><th>b</th>")[0]


@pytest.mark.parametrize("hider", [
    '<span style="display:none">', "<span style='DISPLAY: none !important'>", '<div style="visibility:hidden">',
    '<span style="font-size:0">', '<span style="font-size: 0px">', '<font style="font-size:1px">',
    '<span style="opacity:0.0">', "<span hidden>", "<div hidden='hidden'>",
    '<div style="max-height:0;overflow:hidden">', '<div style="overflow: hidden; max-height: 0px">',
])
def test_text_a_style_hides_is_not_text(hider: str) -> None:
    tag = hider[1:].split()[0].rstrip(">")
    text, _ = html_to_text(f"Buy now {hider}salad words <{tag}>nested</{tag}> more</{tag}> today")
    assert text.split() == ["Buy", "now", "today"]


def test_visible_styles_and_unclosed_hidden_elements_stay_text() -> None:
    assert html_to_text('<span style="font-size:0.9em">small</span>')[0] == "small"
    assert html_to_text('<span style="opacity:0.5">faint</span>')[0] == "faint"
    assert html_to_text('<div style="max-height:0">spills out</div>')[0] == "\n\nspills out\n\n"
    assert html_to_text('<span style="color:#ffffff">white on a dark cell</span>')[0] == "white on a dark cell"
    # an unclosed hidden element must not blank the rest (a spammer's way to hide everything)
    assert html_to_text('<div style="display:none">Buy <b>now</b> today')[0] == "\n\nBuy now today"


def test_unclosed_hidden_elements_are_searched_once() -> None:
    doc = Counted('<span style="display:none">x' * 20_000 + "<p>tail</p>")
    Counted.looked = 0
    assert "tail" in html_to_text(doc)[0]
    assert Counted.looked <= 2 * len(doc)
