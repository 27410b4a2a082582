"""The milter codec (sans I/O): packets split anywhere, each field both ways."""

from __future__ import annotations

import pytest

from queueguard.frontends import milter_protocol as mp


def test_reader_splits_a_stream_cut_anywhere() -> None:
    wire = (mp.optneg(6, 0x1FF, 0x1FFFFF) + mp.connect("h", mp.FAMILY_INET, 25, "192.0.2.1")
            + mp.header("Subject", "x") + mp.packet(mp.BODY, b"y" * 70_000) + mp.packet(mp.EOM))
    for step in (1, 3, 7, 4096, len(wire)):
        reader = mp.PacketReader(1 << 20)
        got = []
        for i in range(0, len(wire), step):
            reader.feed(wire[i:i + step])
            while (p := reader.next()) is not None:
                got.append(p)
        assert [c for c, _ in got] == [mp.OPTNEG, mp.CONNECT, mp.HEADER, mp.BODY, mp.EOM]
        assert got[3][1] == b"y" * 70_000 and reader.buffered == 0


def test_a_packet_trickled_in_byte_by_byte_is_not_copied_again_and_again() -> None:
    """Each read used to copy the whole partial packet: a 4 MiB packet sent a byte at a time was
    quadratic (one client kept the milter at 100 % CPU). The buffer now only grows."""
    wire = mp.packet(mp.BODY, b"z" * 200_000) + mp.packet(mp.EOM)
    reader = mp.PacketReader(1 << 20)
    buffers = set()
    got = []
    for i in range(len(wire)):
        reader.feed(wire[i:i + 1])
        buffers.add(id(reader._buf))
        while (p := reader.next()) is not None:
            got.append(p)
    assert got == [(mp.BODY, b"z" * 200_000), (mp.EOM, b"")] and reader.buffered == 0
    assert len(buffers) == 1  # one buffer, appended to


@pytest.mark.parametrize("wire", [b"\0\0\0\0", b"\0\x10\0\0B"])
def test_reader_refuses_empty_and_oversized_packets(wire: bytes) -> None:
    reader = mp.PacketReader(1024)
    reader.feed(wire)
    with pytest.raises(mp.ProtocolError):
        reader.next()


def test_optneg_with_macro_lists() -> None:
    packet = mp.optneg(6, 0x111, 0x40, {mp.STAGE_HELO: "{tls_version}", mp.STAGE_RCPT: ""})
    assert packet[4] == mp.OPTNEG
    assert mp.parse_optneg(packet[5:]) == (6, 0x111, 0x40, {mp.STAGE_HELO: "{tls_version}", mp.STAGE_RCPT: ""})


def test_connect_for_each_family() -> None:
    assert mp.parse_connect(mp.connect("mx.example", mp.FAMILY_INET6, 2525, "2001:db8::1")[5:]) == (
        "mx.example", "6", 2525, "2001:db8::1")
    assert mp.parse_connect(mp.connect("localhost", mp.FAMILY_UNIX, 0, "/run/x")[5:]) == ("localhost", "L", 0, "/run/x")
    assert mp.parse_connect(mp.connect("unknown", mp.FAMILY_UNKNOWN)[5:]) == ("unknown", "U", 0, "")
    with pytest.raises(mp.ProtocolError):
        mp.parse_connect(b"no-family")


def test_strings_headers_and_macros() -> None:
    assert mp.split_strings(mp.strings(mp.MAIL, ["<a@x.example>", "SIZE=10"])[5:]) == [b"<a@x.example>", b"SIZE=10"]
    assert mp.parse_header(mp.header("Subject", b"caf\xc3\xa9\n\tmore")[5:]) == ("Subject", b"caf\xc3\xa9\n\tmore")
    assert mp.parse_macros(mp.macro(mp.MAIL, {"{auth_authen}": "alice", "i": "4AB"})[5:]) == (
        mp.MAIL, {"auth_authen": "alice", "i": "4AB"})


def test_replies_as_text() -> None:
    def text(packet: bytes) -> str:
        return mp.parse_reply(packet[4], packet[5:])

    assert text(mp.replycode("451", "4.7.1", "slow down")) == "y 451 4.7.1 slow down"
    assert text(mp.addheader("X-A", "b")) == "h X-A: b"
    assert text(mp.chgheader(2, "X-A")) == "m 2 X-A: "
    assert text(mp.quarantine("why")) == "q why"
    assert text(mp.packet(mp.ACCEPT)) == "a"
