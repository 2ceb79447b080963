"""Model work (forward passes, ablation) kept off a served page's event loop.

A served session hands its work to one process-wide model thread and gets the outcome back on
its own event loop, so one user's long input never stalls another session's brushing. One thread,
not a pool: torch already spreads one forward pass over the cores, and a tokenizer or a model is
then never used by two threads at once. Outside a server (a notebook, a script) work runs inline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import panel as pn

T = TypeVar("T")

MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnflows-model")


def on_server() -> bool:
    """True inside a served session (``panel serve`` / ``attnflows serve``), where the event loop must stay free."""
    return pn.state.curdoc is not None and pn.state.curdoc.session_context is not None


def _outcome(work: Callable[[], T]) -> T | Exception:
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - handed to the page's callback, which reports or re-raises it
        return exc


def run_model_work(work: Callable[[], T], done: Callable[[T], Any], failed: Callable[[Exception], Any], executor: Executor = MODEL_THREAD) -> None:
    """``done(work())``, or ``failed(error)``: on a served page ``work`` runs on ``executor``, the callbacks on the session's loop."""
    if not on_server():
        outcome = _outcome(work)
        (failed if isinstance(outcome, Exception) else done)(outcome)
        return

    async def offload() -> None:
        outcome = await asyncio.get_running_loop().run_in_executor(executor, _outcome, work)
        pn.state.execute(partial(failed if isinstance(outcome, Exception) else done, outcome), schedule=True)

    pn.state.onload(offload)  # now if the browser has connected; else once it has, so it sees every change the outcome makes
