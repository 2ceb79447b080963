"""Benchmark the static export against BertViz's model view: time from computed attention to HTML, and the page's size.

    .venv/bin/python benchmarks/bench_export_bertviz.py [--quick]

The offline default BERT (all-MiniLM-L6-v2, 6 layers x 12 heads) and its cached sentiment fine-tune, on
one review of exactly 32, 128 and 512 tokens. What is timed starts once the attention is computed and the
models are loaded, and ends with the page as an HTML string:

- attnflows: ``dashboard_html(records)`` on the records ``extract`` (one model) or ``extract_pair`` (the
  pair) made, as ``attnflows export`` does before writing the file. Past ``extract.DENSE_RECORD_BYTES``
  (512 tokens here) a record holds queries and keys, so the export's time includes computing the weights.
- BertViz (a benchmark-only dependency, the ``bench`` extra): ``model_view(attentions, tokens,
  html_action="return")`` on the tensors of the same model's forward pass over the same input ids
  (``output_attentions=True``). A pair export is set against two model views, one per model: what a
  BertViz user runs to see both.

Target (issue 11): never slower than BertViz at any size, and still far smaller. Each (size, one model or
pair) runs in fresh interpreters (this file with ``--worker``; 3 of them, 1 at 512 tokens or with
``--quick``), so that each first call is a process's first: the export a user runs once from a loaded
model (the median over the processes is printed), with no page template saved in the cache directory (moved
aside for it), as on a fresh install: the default pages' templates ship with the package. One more process a
(size, one model or pair) times the first export of a page whose template is neither saved nor shipped (a
structure's first export ever, once a machine). Later calls alternate the two tools; their median is printed too. BertViz at 512 tokens runs once a process (it takes tens of seconds and gigabytes). Every timed
call starts after ``gc.collect()``: loading torch and the models leaves a heap whose first full collection
(about 0.3 s here) would otherwise land in whichever tool runs first.
"Bokeh alone" rows time a page of as many Bokeh figures as the export draws, one glyph each, through
``bokeh.embed.file_html``: what no page of Bokeh figures built in Python undercuts. Sizes are the UTF-8
bytes of each page, what a file of it holds. What BertViz's page fetches from outside the machine is read
from its HTML. Ratios are baseline / attnflows: above 1, attnflows is faster or smaller.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import print_checks, print_table  # noqa: E402
try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(ROOT))

MB = 1e6
SIZES = (32, 128, 512)
REVIEW = (
    "The film opens on a quiet harbour town where nothing seems to happen. Its lead actor carries every scene with a warmth "
    "that is hard to fake. By the second hour, though, the plot loses its way among too many side stories. The music is lovely, "
    "and the camera lingers on faces rather than on explosions. I would watch it again, if only for the last ten minutes. "
    "The service was slow and the soup arrived cold. Our waiter apologised twice, which was kind, but the kitchen never caught up. "
    "The dessert, a lemon tart, was the best thing we ate all week. Prices are fair for the neighbourhood, and the wine list is "
    "short but careful. We will probably go back on a quieter evening."
).split()
FILLER = "and"  # one word piece, to reach an exact token count


# --------------------------------------------------------------------------------------------------
# one worker: a size, one model or the pair
# --------------------------------------------------------------------------------------------------


def text_of(lm: Any, n: int) -> str:
    """Words of the review (repeated as needed) making exactly ``n`` tokens, [CLS] and [SEP] included."""

    def count(words: list[str]) -> int:
        return len(lm.tokenizer(" ".join(words))["input_ids"])  # not truncated, so that a word too many shows at the model's maximum

    words: list[str] = []
    for word in REVIEW * (n // 8 + 1):
        if count([*words, word]) > n:
            break
        words.append(word)
    while count(words) < n:
        words.append(FILLER)
    return " ".join(words)


def bertviz_attentions(lm: Any, text: str) -> tuple[tuple[Any, ...], list[str]]:
    """What a BertViz user passes to ``model_view``: the forward pass's attentions (``[1, H, n, n]`` per layer) and the tokens."""
    import torch

    from attnflows_panel.extract import encode, padded_inputs

    encoding = encode(lm, text)
    with torch.inference_mode():
        out = lm.model(**padded_inputs(lm, [encoding]), output_attentions=True, return_dict=True)
    return tuple(out.attentions), encoding.tokens


def timed(fn: Any) -> tuple[float, Any]:
    """Seconds ``fn()`` took, from a collected heap, and what it returned (a call pays for its own garbage, not for what loading left)."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bokeh_alone(figures: int) -> float:
    """Seconds Bokeh itself takes for a page of ``figures`` one-glyph figures with its JS inline (``file_html``): the least any page of as many Bokeh figures built in Python costs."""
    from bokeh.embed import file_html
    from bokeh.layouts import column
    from bokeh.plotting import figure
    from bokeh.resources import INLINE

    def page() -> str:
        figs = [figure(width=400, height=400) for _ in range(figures)]
        for fig in figs:
            fig.scatter([0], [0])
        return file_html(column(*figs), INLINE)

    return timed(page)[0]


def load(spec: dict[str, Any]) -> tuple[list[Any], str, tuple[Any, ...]]:
    """The model(s), the input of ``spec["n"]`` tokens and its records."""
    import transformers

    from attnflows_panel.extract import extract, extract_pair
    from attnflows_panel.models import ModelPair, default_pretrained_path, load_encoder
    from attnflows_panel.models.finetune import default_finetuned

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    models = [load_encoder(default_pretrained_path())]
    if spec["pair"]:
        models.append(load_encoder(default_finetuned(progress=False).path))
    text = text_of(models[0], spec["n"])
    return models, text, extract_pair(ModelPair(*models), text) if spec["pair"] else (extract(models[0], None, text),)


@contextmanager
def no_saved_templates(shipped: bool = True) -> Iterator[None]:
    """No page template saved under the cache directory (the saved ones moved aside, then back), as on a fresh install;
    unless ``shipped``, none shipped with the package either (a page structure's first export ever)."""
    from attnflows_panel import page_template

    saved = page_template.template_path("-").parent
    aside = saved.with_name(f"{saved.name}.bench-{os.getpid()}")
    if saved.exists():
        os.replace(saved, aside)
    if not shipped:
        page_template.SHIPPED = Path(tempfile.mkdtemp(prefix="no-shipped-templates-"))
    try:
        yield
    finally:
        shutil.rmtree(saved, ignore_errors=True)
        if aside.exists():
            os.replace(aside, saved)


def unshipped_worker(spec: dict[str, Any]) -> None:
    """Time a process's first export of a page whose template is neither saved nor shipped; a JSON report."""
    from attnflows_panel.export import dashboard_html

    models, _, records = load(spec)
    with no_saved_templates(shipped=False):
        seconds, _ = timed(lambda: dashboard_html(records))
    Path(spec["out"]).write_text(json.dumps({"n_tokens": records[0].n_tokens, "source": type(records[0].source).__name__, "ours_unshipped": seconds}))


def worker(spec: dict[str, Any]) -> None:
    """Load the model(s), extract the input, then time both tools (first calls, then alternating repeats); a JSON report."""
    import numpy as np
    from bertviz import model_view
    from bokeh.models import Plot

    from attnflows_panel.export import dashboard_html, dashboard_layout

    models, text, records = load(spec)
    inputs = [bertviz_attentions(lm, text) for lm in models]

    def ours() -> str:
        return dashboard_html(records)

    def theirs() -> list[str]:
        return [model_view(attention, tokens, html_action="return").data for attention, tokens in inputs]

    info: dict[str, Any] = {"n_tokens": records[0].n_tokens, "source": type(records[0].source).__name__}
    with no_saved_templates():
        info["ours_first"], page = timed(ours)
    info["theirs_first"], pages = timed(theirs)
    info["ours_bytes"] = len(page.encode("utf-8"))
    info["theirs_bytes"] = sum(len(p.encode("utf-8")) for p in pages)
    info["same_attention"] = max(float(np.abs(r.source.dense() - np.stack([a[0].numpy() for a in att])).max()) for r, (att, _) in zip(records, inputs, strict=True))
    if spec["scan"]:
        info["ours_loads"], info["theirs_loads"], info["theirs_require"] = scan_page(page), scan_page(pages[0]), require_paths(pages[0])
    del pages
    info["ours_later"], info["theirs_later"] = [], []
    for _ in range(spec["repeat"]):
        info["ours_later"].append(timed(ours)[0])
        if spec["theirs_repeat"]:
            info["theirs_later"].append(timed(theirs)[0])
    info["figures"] = sum(1 for _ in dashboard_layout(records).select({"type": Plot}))
    bokeh_alone(info["figures"])  # its first call
    info["bokeh_alone"] = [bokeh_alone(info["figures"]) for _ in range(3)]
    Path(spec["out"]).write_text(json.dumps(info))


# --------------------------------------------------------------------------------------------------
# what a page asks for from outside the machine, read from its HTML
# --------------------------------------------------------------------------------------------------


class ResourceTags(HTMLParser):
    """Every tag attribute that makes a browser fetch something (``src``, ``href``, ...)."""

    ATTRIBUTES = {"src", "href", "srcset", "data", "poster", "action", "formaction", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.loads += [f"<{tag} {name}={value}>" for name, value in attrs if name in self.ATTRIBUTES and value]


def scan_page(page: str) -> list[str]:
    """The resource-loading tag attributes of an HTML page."""
    parser = ResourceTags()
    parser.feed(page)
    return parser.loads


def require_paths(page: str) -> dict[str, str]:
    """The modules a page's ``require.config({paths: ...})`` fetches, by name (empty when it has none)."""
    config = re.search(r"require\.config\(\{\s*paths:\s*\{(.*?)\}", page, re.DOTALL)
    return dict(re.findall(r"(\w+)\s*:\s*'([^']+)'", config.group(1))) if config else {}


# --------------------------------------------------------------------------------------------------
# the run and its report
# --------------------------------------------------------------------------------------------------


def run_worker(spec: dict[str, Any], tmp: Path, name: str) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter; its report (its wall time is printed)."""
    spec = {**spec, "out": str(tmp / f"{name}.json")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if not Path(spec["out"]).exists():
        raise RuntimeError(f"worker {name} died (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(Path(spec["out"]).read_text())
    print(f"  {name}: {report['n_tokens']} tokens, record {report['source']}, wall {time.perf_counter() - t0:.1f} s", flush=True)
    return report


def run_processes(spec: dict[str, Any], processes: int, tmp: Path, name: str) -> dict[str, Any]:
    """``spec`` run in ``processes`` fresh interpreters: each one's first call, every later call, the sizes of the first; then the first call of a page with no template."""
    reports = [run_worker(spec if i == 0 else {**spec, "scan": False}, tmp, f"{name}-{i + 1}") for i in range(processes)]
    unshipped = run_worker({**spec, "mode": "unshipped"}, tmp, f"{name}-unshipped")
    merged = {**reports[0], "same_attention": max(r["same_attention"] for r in reports), "ours_unshipped": unshipped["ours_unshipped"]}
    for key in ("ours_first", "theirs_first"):
        merged[key] = statistics.median(r[key] for r in reports)
    for key in ("ours_later", "theirs_later", "bokeh_alone"):
        merged[key] = [t for r in reports for t in r[key]]
    merged["processes"] = processes
    return merged


def fmt_s(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.3f} s"


def ratio(baseline: float | None, ours: float | None) -> str:
    return "—" if not baseline or not ours else f"{baseline / ours:.2f}x"


def rows_of(n: int, what: str, report: dict[str, Any]) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, bool, str]]]:
    """The table rows and the checks of one (size, one model or pair)."""
    tag = f"{n} tok, {what}"
    ours_later = statistics.median(report["ours_later"])
    theirs_later = statistics.median(report["theirs_later"]) if report["theirs_later"] else None
    later = f"median of {len(report['ours_later'])} later calls" + ("" if theirs_later else " (BertViz: its first)")
    theirs_later = theirs_later or report["theirs_first"]
    alone = statistics.median(report["bokeh_alone"])
    processes = report["processes"]
    first = "first call in the process" + (f" (median of {processes} processes)" if processes > 1 else "")
    rows = [
        (f"{tag}: {first}", fmt_s(report["ours_first"]), fmt_s(report["theirs_first"]), ratio(report["theirs_first"], report["ours_first"])),
        (f"{tag}: {later}", fmt_s(ours_later), fmt_s(theirs_later), ratio(theirs_later, ours_later)),
        (f"{tag}: first call of a page whose template is neither shipped nor saved (once a machine)", fmt_s(report["ours_unshipped"]), fmt_s(report["theirs_first"]), ratio(report["theirs_first"], report["ours_unshipped"])),
        (f"{tag}: Bokeh alone, {report['figures']} one-glyph figures inline", fmt_s(alone), fmt_s(theirs_later), ratio(theirs_later, alone)),
        (f"{tag}: page size", f"{report['ours_bytes'] / MB:.1f} MB", f"{report['theirs_bytes'] / MB:.1f} MB", ratio(report["theirs_bytes"], report["ours_bytes"])),
    ]
    checks = [
        (f"{tag}: first call no slower than BertViz", report["ours_first"] <= report["theirs_first"], f"{fmt_s(report['ours_first'])} vs {fmt_s(report['theirs_first'])}"),
        (f"{tag}: later calls no slower than BertViz", ours_later <= theirs_later, f"{fmt_s(ours_later)} vs {fmt_s(theirs_later)}"),
        (f"{tag}: page smaller than BertViz's", report["ours_bytes"] < report["theirs_bytes"], f"{report['ours_bytes'] / MB:.1f} MB vs {report['theirs_bytes'] / MB:.1f} MB"),
    ]
    return rows, checks


def print_requests(report: dict[str, Any]) -> None:
    """What each page asks for from outside the machine, as read from its HTML (at the first size)."""
    print(f"attnflows' page: {len(report['ours_loads'])} tags loading a resource{': ' + ', '.join(report['ours_loads']) if report['ours_loads'] else ''} (Bokeh's JS and CSS inline)")
    outside = [load for load in report["theirs_loads"] if re.search(r"=(https?:)?//", load)]
    print(f"BertViz's page: {len(outside)} tags loading from outside the machine: {', '.join(outside) or 'none'}")
    if report["theirs_require"]:
        modules = ", ".join(f"{name} from {url}" for name, url in report["theirs_require"].items())
        print(f"  and its script has require.js fetch {modules} before it draws anything (its require.config); offline, none of it loads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one process per size instead of 3, 3 later calls instead of 7, and no pair at 512 tokens")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        {"unshipped": unshipped_worker}.get(spec.get("mode", ""), worker)(spec)
        return
    import bertviz  # noqa: F401  (the bench extra: fail here, not in a worker)
    import bokeh
    from importlib.metadata import version

    started = time.perf_counter()
    repeat = 3 if args.quick else 7
    print(f"attnflows static export vs BertViz {version('bertviz')} model_view (bokeh {bokeh.__version__}); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows: list[tuple[str, str, str, str]] = []
    checks: list[tuple[str, bool, str]] = []
    first: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for n in SIZES:
            for pair in (False, True):
                if pair and args.quick and n == SIZES[-1]:
                    continue
                spec = {"n": n, "pair": pair, "repeat": repeat if n < SIZES[-1] else 3, "theirs_repeat": n < SIZES[-1], "scan": first is None}
                processes = 1 if args.quick or n == SIZES[-1] else 3
                report = run_processes(spec, processes, Path(tmp), f"{n}-{'pair' if pair else 'one'}")
                first = first or report
                more_rows, more_checks = rows_of(n, "pair vs two model views" if pair else "one model", report)
                rows += more_rows
                checks += more_checks
                checks.append((f"{n} tok, {'pair' if pair else 'one model'}: both tools drew the same attention", report["same_attention"] < 1e-4, f"max |difference| {report['same_attention']:.1e}"))
    print()
    print_table(rows)
    print("(times: from the records, attention computed and models loaded, to the page as an HTML string: attnflows' dashboard_html(records),")
    print(" BertViz's model_view(attentions, tokens, html_action='return'); at 512 tokens attnflows' record holds queries and keys, so its time")
    print(" includes computing the weights. Every timed call starts after gc.collect(). Pair rows: attnflows' pair export against")
    print(" BertViz's two model views, one per model. attnflows fills a page template: with no template saved in the cache directory,")
    print(" as on a fresh install, the default pages' ship with the package; 'neither shipped nor saved': a process's first export of a")
    print(" page with no template at all (another --top-heads, say), which renders the page's figures once and saves them.")
    print(" 'Bokeh alone': a page of as many Bokeh figures as the export draws, one glyph each, through bokeh.embed.file_html, against")
    print(" BertViz's later calls: what a page of Bokeh figures built in Python for each export cannot undercut.)")
    print()
    print_requests(first)
    print()
    print_checks(checks, started)


if __name__ == "__main__":
    main()
