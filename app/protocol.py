"""uvicorn's httptools protocol with a limit on the request line and headers.

httptools has none of its own (h11 has 16 KiB): past the limit the request is answered 400
and the connection closed, before the app sees it. ``rerank serve`` names this class by its
import path, so uvicorn's worker processes import it themselves.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 16_384  # request line and headers together: h11's own default


class BoundedHttpTools(HttpToolsProtocol):
    _header_bytes = 0

    def on_message_begin(self) -> None:
        self._header_bytes = 0
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            # Raised in a parser callback: httptools reports it as a parser error, on which
            # uvicorn answers 400 and closes the connection.
            raise ValueError(f"request headers past {MAX_HEADER_BYTES} bytes")
