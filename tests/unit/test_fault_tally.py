"""The fault matrix's accounting (bench/faults.py): each offered message placed once, the lost
and the duplicated named, a duplicate explained only by a transaction cut after the body."""

from __future__ import annotations

from bench.faults import Message, Row, _gist, tally


def msg(mid: str, expect: str = "delivered") -> Message:
    return Message(mid, "s@sender.example", "r@test.example", b"", expect)


def test_each_message_is_placed_once_in_the_first_place_that_holds_it() -> None:
    offered = [msg("d"), msg("q", "quarantined"), msg("r", "rejected"), msg("w"), msg("gone")]
    row = Row("f", "how")
    tally(row, offered, ["d"], ["q"], {"r": "scan:clamav"}, ["w"], set())
    assert (row.offered, row.delivered, row.quarantined, row.rejected, row.queued) == (5, 1, 1, 1, 1)
    assert row.lost_ids == ["gone"] and row.lost == 1
    assert not row.duplicated_ids and not row.misplaced_ids and not row.ok


def test_duplicates_and_which_are_explained() -> None:
    offered = [msg("twice"), msg("both"), msg("placed-and-queued"), msg("cut")]
    row = Row("f", "how")
    tally(row, offered, ["twice", "twice", "both", "placed-and-queued", "cut", "cut"], ["both"], {},
          ["placed-and-queued"], cut={"cut"})
    assert row.duplicated_ids == ["twice", "both", "placed-and-queued", "cut"]
    assert row.unexplained_ids == ["twice", "both", "placed-and-queued"]
    assert row.lost == 0 and row.delivered == 4


def test_misplaced_is_a_final_place_other_than_the_policy_s() -> None:
    row = Row("f", "how", witnessed=True)
    tally(row, [msg("a", "quarantined"), msg("b", "rejected")], ["a"], [], {}, ["b"], set())
    assert row.misplaced_ids == ["a"]  # still queued is not a final place
    assert row.lost == 0 and not row.ok  # not a loss, but the row fails: the policy did not hold


def test_deferral_gist_keeps_the_reply_not_the_addresses() -> None:
    line = ("bob@test.example R=relay T=remote_smtp defer (-44) H=127.0.0.1 [127.0.0.1]: SMTP error from remote "
            "mail server after RCPT TO:<bob@test.example>: 451 4.4.1 No downstream available (connect failed)")
    assert _gist(line) == "451 4.4.1 No downstream available"
    assert _gist("a@b R=relay T=remote_smtp defer (111): Connection refused") == "Connection refused"
