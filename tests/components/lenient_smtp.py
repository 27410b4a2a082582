"""A deliberately lenient SMTP server: the weak MTA an attacker hopes sits behind the guard.

It ends DATA at a dot between any two line breaks (CR, LF or CRLF), with or without a NUL next
to the dot, as the servers of the 2023 SMTP-smuggling research did; whatever follows is read as
new commands. It records every MAIL FROM it accepts and every message it "delivers", so a test
can see whether a smuggled transaction ever reached it. With `data_answer` it is also a broken
MTA: it answers the DATA command with that (say a 250) and reads on for commands.
"""

from __future__ import annotations

import asyncio
import re
import threading
from types import TracebackType

from queueguard.harness.ports import free_port, wait_port

LENIENT_END = re.compile(rb"(?:\r\n|\r|\n)\x00?\.\x00?(?:\r\n|\r|\n)")


class LenientSmtp:
    def __init__(self, data_answer: bytes | None = None) -> None:
        self.port = free_port()
        self.data_answer = data_answer
        self.senders: list[str] = []
        self.messages: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lenient.test ESMTP\r\n")
        buf = b""
        try:
            while True:
                while b"\n" not in buf:
                    chunk = await reader.read(65536)
                    if not chunk:
                        return
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                cmd = line.rstrip(b"\r").upper()
                if cmd.startswith((b"EHLO", b"HELO")):
                    writer.write(b"250-lenient.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif cmd.startswith(b"MAIL FROM:"):
                    self.senders.append(line.rstrip(b"\r")[10:].decode(errors="replace"))
                    writer.write(b"250 ok\r\n")
                elif cmd.startswith((b"RCPT", b"RSET", b"NOOP")):
                    writer.write(b"250 ok\r\n")
                elif cmd == b"DATA" and self.data_answer is not None:
                    writer.write(self.data_answer + b"\r\n")
                elif cmd == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    data = b"\r\n"  # a dot right at the start of DATA ends it too
                    while (m := LENIENT_END.search(data)) is None:
                        chunk = await reader.read(65536)
                        if not chunk:
                            return
                        data += chunk
                    self.messages.append(data[2:m.start()])
                    buf = data[m.end():] + buf
                    writer.write(b"250 delivered\r\n")
                elif cmd == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"500 what\r\n")
                await writer.drain()
        except ConnectionError:
            return  # the client went away: nothing more to read
        finally:
            writer.close()

    def _run(self, started: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        self._server = loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        started.set()
        loop.run_forever()
        self._server.close()
        loop.run_until_complete(self._server.wait_closed())
        loop.close()

    def __enter__(self) -> LenientSmtp:
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)
        wait_port("127.0.0.1", self.port)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
