"""A Bokeh-protocol client for load tests: a session that does what a page's BokehJS does, without a browser.

It opens a session on the server's websocket, pulls the document, says the document is ready (as BokehJS
does once the page is drawn, which is when attnflows builds its views), and then changes models as a
page's widgets would: the sentence box's value, the head grid's selected cells. The server's patches are
applied to its copy of the document, so an update is timed until the flow diagram's title has changed and
no spinner is left. Built on Bokeh's public protocol modules (``bokeh.protocol``, ``bokeh.document``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import importlib
import pkgutil

import panel.models
from bokeh.client.websocket import WebSocketClientConnectionWrapper
from bokeh.document import Document
from bokeh.document.events import DocumentPatchedEvent
from bokeh.events import DocumentReady
from bokeh.models import ColumnDataSource, GlyphRenderer, Plot, TextAreaInput
from bokeh.protocol import Protocol
from bokeh.protocol.receiver import Receiver
from bokeh.util.token import generate_jwt_token, generate_session_id
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

import attnflows_panel.app  # noqa: F401  (the app's own models: a ReactiveHTML's model class is made with its class)

for _module in pkgutil.iter_modules(panel.models.__path__):  # Panel's models, some imported only when first used
    importlib.import_module(f"panel.models.{_module.name}")

LOADING = "pn-loading"


class ProtocolSession:
    """One session of ``app`` on ``host:port`` over the Bokeh protocol; ``errors`` collects what went wrong."""

    def __init__(self, host: str, port: int, app: str, errors: list[str]) -> None:
        self.host, self.port, self.app, self.errors = host, port, app, errors
        self.document = Document()
        self.protocol = Protocol()
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.patched: set[int] = set()  # ids of the models the server's patches have changed (``forget`` empties it)

    async def open(self, timeout: float, is_ready: Callable[[Document], bool]) -> None:
        """Connect, pull the document, send DocumentReady and wait until ``is_ready(document)``."""
        session_id = generate_session_id()
        where = f"{self.host}:{self.port}"
        token = generate_jwt_token(session_id, extra_payload={"headers": {"Host": where}, "cookies": {}})
        request = HTTPRequest(f"ws://{where}/{self.app}/ws", headers={"Origin": f"http://{where}"})
        socket = await websocket_connect(request, subprotocols=["bokeh", token], max_message_size=512 * 1024 * 1024)
        self.connection = WebSocketClientConnectionWrapper(socket)
        self._receiver = Receiver(self.protocol)
        ack = await self._next_message()
        if ack is None or ack.msgtype != "ACK":
            raise ConnectionError(f"{self.app}: no ACK from the server ({ack and ack.msgtype})")
        await self.protocol.create("PULL-DOC-REQ").send(self.connection)
        reply = await self._next_message()
        while reply is not None and reply.msgtype == "PATCH-DOC":  # sent before the reply, so already in the document it brings
            reply = await self._next_message()
        if reply is None or reply.msgtype != "PULL-DOC-REPLY":
            raise ConnectionError(f"{self.app}: no document from the server ({reply and reply.msgtype})")
        reply.push_to_document(self.document)
        self.document.on_change(self._send_change)
        self._reader = asyncio.create_task(self._read())
        self.document.callbacks.send_event(DocumentReady())  # as BokehJS does once the page is drawn
        await self.wait_for(lambda: is_ready(self.document), timeout)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.connection.close()

    async def _next_message(self):
        while True:
            fragment = await self.connection.read_message()
            if fragment is None:
                return None
            message = await self._receiver.consume(fragment)
            if message is not None:
                return message

    async def _read(self) -> None:
        while True:
            message = await self._next_message()
            if message is None:
                return
            if message.msgtype == "PATCH-DOC":
                message.apply_to_document(self.document, self)
                self._changed.set()
            elif message.msgtype == "ERROR":
                self.errors.append(f"{self.app}: server error: {message.content.get('text', '')[:200]}")

    def _send_change(self, event: object) -> None:
        if not isinstance(event, DocumentPatchedEvent):
            return
        if event.setter is self:  # the server's change, being applied here
            self.patched.add(id(getattr(event, "model", None)))
        else:
            asyncio.get_running_loop().create_task(self.protocol.create("PATCH-DOC", [event]).send(self.connection))

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        """Until ``condition()`` holds after some patch from the server (TimeoutError after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while not condition():
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.app}: no such state within {timeout:.0f} s")
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    def source_named(self, name: str) -> ColumnDataSource | None:
        return next(iter(self.document.select({"type": ColumnDataSource, "name": name})), None)

    def plot(self, title: str) -> Plot | None:
        """The first plot whose title starts with ``title``."""
        return next((p for p in self.document.select({"type": Plot}) if p.title is not None and (p.title.text or "").startswith(title)), None)

    def loading(self) -> bool:
        return any(LOADING in (getattr(m, "css_classes", None) or []) for m in self.document.models)

    def text_box(self) -> TextAreaInput:
        return next(iter(self.document.select({"type": TextAreaInput})))

    def cells(self, grid_title: str) -> ColumnDataSource:
        """The head grid's cell source (the renderer with the most rows)."""
        plot = self.plot(grid_title)
        return max((r.data_source for r in plot.select({"type": GlyphRenderer})), key=lambda s: len(next(iter(s.data.values()), [])))
