"""Benchmark start-up: the time to the first output of ``attnflows`` commands, each against what it cannot avoid.

    .venv/bin/python benchmarks/bench_start.py [--runs N] [--quick]

Each command runs in a fresh process, N times (default 5), alternating with its baseline so both see the
same load; the median is printed. The time is from starting the process to its first line on stdout
(``attnflows export`` prints its one line once the file is written). Caches are warm, as on every start
after the first: the default fine-tune exists (made first if missing) and the operating system has read
the files before.

- ``attnflows export`` of a 32-token sentence with the default pair, against a process that imports torch
  and transformers, loads both models (eager attention, their tokenizer) and runs both forward passes with
  ``output_attentions=True``: what any tool showing these models' attention must do. The rest is attnflows'
  own: the libraries of the views (HoloViews, Bokeh, Panel, pandas, scipy), finding the cached fine-tune,
  checking the weights, the trace and the HTML file.
- ``attnflows --help``, ``attnflows extract --help`` and ``attnflows info`` against ``python -c pass``.
- The fine-tune cache check in one process (``default_finetuned()``, torch imported before), by the
  recorded hashes of its files against the check every start made before: reading and cleaning the
  bundled corpus and hashing it, the base weights and the checkpoint's weights (median of 7 in a row).

Ratios are baseline / attnflows: above 1, attnflows is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import print_checks, print_table  # noqa: E402
try:
    import attnflows_panel  # noqa: F401
except ImportError:  # run from a checkout without an install
    sys.path.insert(0, str(ROOT))

SENTENCE = "The self-driving car stopped safely at the busy corner, and I finally felt relaxed after a long and very stressful day of driving in town."
TOKENS = 32  # with [CLS] and [SEP], in the default BERT's tokenizer
HEAVY = ("torch", "transformers", "holoviews", "bokeh", "panel")
EXPORT_RATIO = 0.4  # target: baseline / attnflows export, medians (attnflows' own work at most 1.5 times the models')
HELP_S = 0.25  # target: the help of a command prints in under this
INFO_S = 1.0  # target: info (which reads the stored runs with pandas) prints in under this
CHECK_S = 0.05  # target: the fine-tune cache check takes under this


def attnflows_command() -> list[str]:
    """The installed ``attnflows`` script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("attnflows")
    return [str(script)] if script.exists() else [sys.executable, "-m", "attnflows_panel.cli"]


def first_output(command: list[str]) -> tuple[float, str]:
    """Seconds from starting ``command`` to its first line on stdout, and that line (the process must succeed)."""
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: a process writing much to stderr never blocks
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
        line = process.stdout.readline()
        seconds = time.perf_counter() - started
        rest, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command[:3])} failed ({process.returncode}): {(errors.read().strip() or rest.strip() or 'no output').splitlines()[-1]}")
    return seconds, line.strip()


def medians(commands: dict[str, list[str]], runs: int) -> tuple[dict[str, float], dict[str, str]]:
    """The median time to first output of each command over ``runs`` rounds (the commands alternate), and each one's line."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    lines: dict[str, str] = {}
    for _ in range(runs):
        for name, command in commands.items():
            seconds, lines[name] = first_output(command)
            times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}, lines


def baseline_worker(pretrained: str, finetuned: str, text: str) -> None:
    """Import torch and transformers, load both models with eager attention, run both forward passes; print the token count."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    models = [AutoModel.from_pretrained(pretrained, attn_implementation="eager"), AutoModelForSequenceClassification.from_pretrained(finetuned, attn_implementation="eager")]
    inputs = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        attentions = [model.eval()(**inputs, output_attentions=True).attentions for model in models]
    print(f"{attentions[0][0].shape[-1]} tokens, {len(attentions[0])} + {len(attentions[1])} layers of attention", flush=True)


def check_worker(mode: str, repeat: int) -> None:
    """Time the fine-tune cache check in this process (torch imported first); print the median in seconds as JSON."""
    import torch  # noqa: F401 - a start that exports has it imported anyway

    from attnflows_panel import corpus, paths
    from attnflows_panel.models import finetune

    if mode == "former":  # every hash recomputed, and the corpus read, as each start did before the hashes were recorded
        for module in (corpus, finetune):
            module.recorded_sha256 = paths.sha256_file
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        if mode == "former":
            corpus.sentiment_corpus()
        result = finetune.default_finetuned(progress=False)
        times.append(time.perf_counter() - started)
        assert result.reused, "the default fine-tune was not found in the cache"
    print(json.dumps({"median": statistics.median(times)}))


IMPORTED = """
import json, sys
from attnflows_panel.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[1])))))
"""


def imported_by(arguments: list[str]) -> list[str]:
    """Which of ``HEAVY`` the CLI imports for ``arguments`` (in a fresh interpreter)."""
    result = subprocess.run([sys.executable, "-c", IMPORTED, json.dumps(HEAVY), *arguments], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def ratio(baseline: float, ours: float) -> str:
    r = baseline / ours
    return f"{r:.1f}×" if r >= 1 else f"{r:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="processes per command (default 5; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 runs of each command")
    parser.add_argument("--baseline-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--check-worker", choices=("recorded", "former"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(*args.baseline_worker)
        return
    if args.check_worker:
        check_worker(args.check_worker, repeat=7)
        return

    started = time.perf_counter()
    runs = args.runs or (3 if args.quick else 5)
    print(f"start-up benchmark: {runs} fresh processes per command; load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)", flush=True)
    prepared = subprocess.run(
        [sys.executable, "-c", "from attnflows_panel.models import default_pretrained_path\nfrom attnflows_panel.models.finetune import default_finetuned\n"
         "print(default_pretrained_path()); print(default_finetuned().path)"],
        capture_output=True, text=True, check=True, timeout=3600,
    )  # fine-tunes once if the cache is empty, and records the hashes of the files it identifies
    pretrained, finetuned = prepared.stdout.strip().splitlines()[-2:]
    attnflows = attnflows_command()
    python = [sys.executable, "-c", "pass"]
    page = Path(tempfile.gettempdir()) / f"attnflows-bench-start-{os.getpid()}.html"
    export = [*attnflows, "export", "--text", SENTENCE, "-o", str(page), "--quiet"]
    baseline = [sys.executable, __file__, "--baseline-worker", pretrained, finetuned, SENTENCE]

    first_output(export)  # once untimed: a first start after an install compiles the modules' bytecode
    timed, lines = medians({"export": export, "baseline": baseline}, runs)
    quick, _ = medians({"--help": [*attnflows, "--help"], "extract --help": [*attnflows, "extract", "--help"], "info": [*attnflows, "info"], "python": python}, runs)
    check = {mode: json.loads(subprocess.run([sys.executable, __file__, "--check-worker", mode], capture_output=True, text=True, check=True).stdout)["median"]
             for mode in ("recorded", "former")}
    page.unlink(missing_ok=True)
    n_tokens = int(re.search(r"(\d+) tokens", lines["export"]).group(1))

    rows = [
        (f"attnflows export, {n_tokens}-token sentence, default pair (baseline: torch + transformers, load both, forward)", fmt_s(timed["export"]), fmt_s(timed["baseline"]), ratio(timed["baseline"], timed["export"])),
        *((f"attnflows {name} (baseline: python -c pass)", fmt_s(quick[name]), fmt_s(quick["python"]), ratio(quick["python"], quick[name])) for name in ("--help", "extract --help", "info")),
        ("fine-tune cache check, in process (baseline: the former check, corpus read and files hashed)", fmt_s(check["recorded"]), fmt_s(check["former"]), ratio(check["former"], check["recorded"])),
    ]
    print()
    print_table(rows)
    print(f"(medians of {runs} fresh processes each; the cache check: median of 7 calls in one process; ratio: baseline / attnflows)")
    print(f"export printed: {lines['export']}")
    print(f"baseline printed: {lines['baseline']}")
    print()

    checks = [
        (f"the export's input is {TOKENS} tokens", n_tokens == TOKENS, f"{n_tokens}"),
        (f"attnflows export at most {1 / EXPORT_RATIO:g}× the baseline", timed["baseline"] / timed["export"] >= EXPORT_RATIO, f"ratio {ratio(timed['baseline'], timed['export'])}, {timed['export'] - timed['baseline']:+.2f} s"),
        *((f"attnflows {name} under {limit:g} s", quick[name] < limit, fmt_s(quick[name])) for name, limit in (("--help", HELP_S), ("extract --help", HELP_S), ("info", INFO_S))),
        *((f"attnflows {' '.join(a)} imports none of {', '.join(HEAVY)}", not (found := imported_by(list(a))), ", ".join(found) or "none")
          for a in (("--help",), ("extract", "--help"), ("export", "--help"), ("info",))),
        (f"fine-tune cache check under {CHECK_S * 1e3:g} ms", check["recorded"] < CHECK_S, fmt_s(check["recorded"])),
    ]
    print_checks(checks, started)


if __name__ == "__main__":
    main()
