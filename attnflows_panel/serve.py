"""``attnflows serve``: both dashboards from the installed package, on loopback unless asked otherwise."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import html
import ipaddress
from collections.abc import Callable
from typing import Any

LOOPBACK_NAMES = ("localhost", "127.0.0.1")


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and addresses of this machine only (127.0.0.0/8, ::1)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def websocket_origins(address: str, port: int, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``host:port`` pairs a browser may open sessions from: loopback names, the served address and ``extra``."""
    hosts = list(LOOPBACK_NAMES) if is_loopback(address) else [address]
    origins = [f"{host}:{port}" for host in hosts] + [origin if ":" in origin else f"{origin}:{port}" for origin in extra]
    return list(dict.fromkeys(origins))


def served_host(host: str, origins: list[str]) -> bool:
    """True when a request's Host header names one of ``origins`` (a missing port is port 80)."""
    return (host if ":" in host.rsplit("]", 1)[-1] else f"{host}:80").lower() in origins


def release_memory() -> bool:
    """Collect cycles and hand the heap's free pages back to the system (glibc keeps them otherwise); False where there is no glibc."""
    gc.collect()
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _release_after_session(_context: Any) -> None:
    """Once a session is discarded, and its objects with it, give their memory back."""
    from tornado.ioloop import IOLoop

    IOLoop.current().call_later(5.0, release_memory)


def host_checked(factory: Callable[[], Any], origins: list[str]) -> Callable[[], Any]:
    """``factory``'s page for requests addressed to ``origins``; a one-line refusal for any other Host (DNS rebinding)."""

    def page() -> Any:
        import panel as pn

        host = str(pn.state.headers.get("Host", ""))
        if not served_host(host, origins):
            return pn.pane.Markdown(f"attnflows does not serve the address {html.escape(host)}: open it as {html.escape(origins[0])}.")
        pn.state.on_session_destroyed(_release_after_session)
        return factory()

    return page


def serve(address: str, port: int, *, extra_origins: list[str] | tuple[str, ...] = (), show: bool = False) -> None:
    """Serve /compare and /single on ``address:port`` until interrupted; says where it listens."""
    import panel as pn

    from attnflows_panel.app import create_app, create_single_app

    origins = websocket_origins(address, port, extra_origins)
    where = "this machine only" if is_loopback(address) else "the network: anyone who can reach this address gets a session"
    print(f"attnflows: serving http://{address}:{port}/compare and http://{address}:{port}/single ({where}); Ctrl+C stops", flush=True)
    pages = {"compare": host_checked(create_app, origins), "single": host_checked(create_single_app, origins)}
    pn.serve(pages, address=address, port=port, websocket_origin=origins, show=show, verbose=False, title="attnflows")
