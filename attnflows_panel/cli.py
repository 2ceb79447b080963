"""The ``attnflows`` command: finetune, extract, info, prepare, a text demo and a static HTML export."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from attnflows_panel.errors import AttnflowsError, InputError
from attnflows_panel.paths import home

DEMO_TEXT = "The self-driving car stopped safely, and I finally felt relaxed."


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {number}")
    return number


def _rate(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"expected a learning rate in (0, 1), got {number}")
    return number


def _weight(value: str) -> float:
    """An attention weight in (0, 1]."""
    try:
        weight = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}") from None
    if not 0 < weight <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}")
    return weight


def _whole_number_or_text(value: str) -> int | str:
    """An ``int`` when ``value`` is one, else ``value`` itself for the command to refuse in one line."""
    try:
        return int(value)
    except ValueError:
        return value


def _finetune_config(args: argparse.Namespace) -> Any:
    from attnflows_panel.models.finetune import FinetuneConfig

    return FinetuneConfig(
        base=args.base or "",
        data=str(args.data) if args.data else "",
        max_train=args.max_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        objective=args.objective,
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    from attnflows_panel.models.finetune import finetune

    result = finetune(_finetune_config(args), force=args.force, progress=not args.quiet)
    m = result.metrics
    state = "reused cached checkpoint" if result.reused else f"fine-tuned in {m['train_seconds']:.0f} s"
    print(f"{state}: {result.path}")
    if m.get("objective") == "lm":
        print(
            f"task {m['task']} (language modelling), {m['n_train']} training texts, {m['steps']} steps; held-out perplexity "
            f"{m['heldout_perplexity']:.2f} (base model {m['baseline_perplexity']:.2f}), next-token accuracy "
            f"{m['heldout_next_token_accuracy']:.1%} (base model {m['baseline_next_token_accuracy']:.1%}) on {m['n_heldout']} texts"
        )
        return 0
    print(
        f"task {m['task']}, {m['n_train']} training examples, {m['steps']} steps; held-out accuracy "
        f"{m['heldout_accuracy']:.1%} on {m['n_heldout']} (majority baseline {m['majority_baseline']:.1%})"
    )
    return 0


def _say(message: str) -> None:
    """A line of what a command is doing, on stderr (not with ``--quiet``)."""
    print(f"attnflows: {message}", file=sys.stderr, flush=True)


def _models_for(args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    from attnflows_panel.models import default_pretrained_path, load_encoder
    from attnflows_panel.models.finetune import default_finetuned

    if progress:
        _say("loading the model…" if args.model else "loading the models…")
    trust = args.trust_remote_code
    if args.model:
        return {"model": load_encoder(args.model, args.device, trust_remote_code=trust)}
    pretrained = load_encoder(args.pretrained or default_pretrained_path(), args.device, trust_remote_code=trust)
    finetuned_path = args.finetuned or default_finetuned(progress=progress).path
    return {"pretrained": pretrained, "finetuned": load_encoder(finetuned_path, args.device, trust_remote_code=trust)}


def _flag_value(command: str, flag: str, check: Callable[[Any], Any], value: Any) -> Any:
    """``check(value)``, its error naming ``flag`` as argparse names a bad flag."""
    try:
        return check(value)
    except InputError as exc:
        raise InputError(f"argument {flag}: {exc} (see attnflows {command} --help)") from None


def _check_model_flags(args: argparse.Namespace) -> None:
    """Refuse ``--model`` given with ``--pretrained`` or ``--finetuned`` (one model, or a pair)."""
    if args.model and (args.pretrained or args.finetuned):
        raise InputError("give --model for one model, or --pretrained/--finetuned for a pair, not both")


def _default_run_dir(corpus_path: Path | None) -> Path:
    from attnflows_panel.prepare import default_run_dir

    return home() / "runs" / corpus_path.stem if corpus_path else default_run_dir()


def cmd_extract(args: argparse.Namespace) -> int:
    from attnflows_panel.cluster import check_cluster_flags, cluster_client
    from attnflows_panel.corpus import heldout_sentiment_corpus, read_corpus
    from attnflows_panel.store import check_run_dir, extract_corpus

    check_cluster_flags(args.scheduler, args.workers)  # before the corpus is read
    _check_model_flags(args)
    if args.trust_remote_code and (args.scheduler or args.workers):
        raise InputError("--trust-remote-code runs a model's own code in this process only: leave out --workers and --scheduler (Dask workers never run it)")
    corpus = read_corpus(args.corpus, encoding=args.encoding) if args.corpus else heldout_sentiment_corpus()
    if args.limit:
        corpus = corpus.subset(range(min(args.limit, len(corpus))))
    corpus.check_texts(args.corpus.name if args.corpus else "the default corpus")  # before any model loads
    output = check_run_dir(args.output if args.output else _default_run_dir(args.corpus))  # before any model loads
    if args.workers and not args.quiet:
        _say(f"starting a local Dask cluster of {args.workers} workers (each loads the models)…")
    with cluster_client(args.scheduler, args.workers, on_wait=lambda message: print(f"attnflows: {message}", file=sys.stderr)) as client:  # a bad address or count fails before any model loads
        models = _models_for(args, progress=not args.quiet)
        store = extract_corpus(
            models, corpus, output, shard_size=args.shard_size, max_batch=args.batch_size, progress=not args.quiet,
            tau_min=args.tau_min, client=client, verify=args.verify, overwrite=args.overwrite,
            on_resume=lambda message: print(f"attnflows: {message}", file=sys.stderr),
        )
    print(f"{output}: {store.describe()}")
    return 0


def _check_input(args: argparse.Namespace, purpose: str) -> None:
    """Read ``--text-file`` into ``args.text``; refuse ``--text`` / ``--text-pair`` that are empty or not text, before any model loads."""
    from attnflows_panel.corpus import read_text_file
    from attnflows_panel.extract import check_text

    if args.text_file is not None:
        if args.text is not None:
            raise InputError("give --text or --text-file, not both")
        args.text = check_text(read_text_file(args.text_file, args.encoding), f"--text-file {args.text_file.name}", "give a file with the text to " + purpose)
    elif args.text is None:
        args.text = DEMO_TEXT
    check_text(args.text, "--text", f"give the sentence to {purpose}")
    if args.text_pair is not None:
        check_text(args.text_pair, "--text-pair", "leave it out for a single sentence")


def cmd_info(args: argparse.Namespace) -> int:
    from attnflows_panel.models.loading import default_pretrained_path
    from attnflows_panel.store import RunStore

    if args.run:
        store = RunStore.open(args.run)
        print(json.dumps({k: v for k, v in store.manifest.items() if k != "shards"}, indent=2))
        print(f"stored: {store.describe()}")
        return 0
    root = home()
    print(f"cache: {root}{'' if root.exists() else ' (empty)'}")
    try:
        print(f"default pre-trained model: {default_pretrained_path()}")
    except AttnflowsError as exc:
        print(f"default pre-trained model: unavailable ({exc})")
    for checkpoint in sorted((root / "models").glob("*/metrics.json")):
        m = json.loads(checkpoint.read_text())
        if m.get("objective") == "lm":
            print(f"fine-tuned: {checkpoint.parent}  task {m.get('task')} (language modelling), held-out perplexity {m.get('heldout_perplexity', float('nan')):.2f}")
        else:
            print(f"fine-tuned: {checkpoint.parent}  task {m.get('task')}, held-out accuracy {m.get('heldout_accuracy', float('nan')):.1%}")
    for manifest in sorted((root / "runs").glob("*/manifest.json")):
        try:
            print(f"run: {manifest.parent}  {RunStore.open(manifest.parent).describe()}")
        except AttnflowsError as exc:
            print(f"run: {manifest.parent}  unreadable ({exc})")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from attnflows_panel.prepare import prepare_default

    prepared = prepare_default(progress=not args.quiet, report=lambda stage: None if args.quiet else print(stage, flush=True))
    store = prepared.store
    print(f"default models ready; corpus run {store.path}: {store.describe()}; head map of {len(prepared.head_map.points)} heads; sentence table of {len(prepared.corpus)} rows")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from attnflows_panel.extract import extract_pair
    from attnflows_panel.models import default_pair

    _check_input(args, "compare")
    pair = default_pair(progress=not args.quiet)
    records = extract_pair(pair, args.text, args.text_pair)
    tokens = records[0].tokens
    print(f"{len(tokens)} tokens: {' '.join(tokens)}")
    for name, record in zip(("pre-trained", "fine-tuned"), records, strict=True):
        cls_row = record.source.rows(record.n_layers - 1, None, [0])[:, 0].mean(0)
        top = np.argsort(cls_row)[::-1][:5]
        focus = ", ".join(f"{tokens[i]} {cls_row[i]:.2f}" for i in top)
        line = f"{name:>11}: [CLS] in the last layer attends to {focus}"
        if record.predicted_label is not None:
            line += f"; predicts {record.predicted_label} ({record.probabilities.max():.0%})"
        print(line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from attnflows_panel.analysis.flows import validate_alpha, validate_tau
    from attnflows_panel.export import export_dashboard, output_path, validate_top_heads, validate_top_k
    from attnflows_panel.extract import extract, extract_pair
    from attnflows_panel.models import ModelPair

    _check_input(args, "export")
    _check_model_flags(args)
    target = output_path(args.output)
    _flag_value("export", "--tau", validate_tau, args.tau)
    _flag_value("export", "--alpha", validate_alpha, args.alpha)
    _flag_value("export", "--top-heads", validate_top_heads, args.top_heads)
    top_k = _flag_value("export", "--top-k", validate_top_k, args.top_k)
    models = _models_for(args, progress=not args.quiet)
    records = (extract(models["model"], None, args.text, args.text_pair),) if args.model else extract_pair(ModelPair(**models), args.text, args.text_pair)
    path = export_dashboard(records, target, tau=args.tau, alpha=args.alpha, top_heads=args.top_heads, top_k=top_k)
    print(f"{path}: {path.stat().st_size / 2**20:.1f} MB, {records[0].n_tokens} tokens; opens offline in any browser")
    return 0


TRUST_HELP = "run the Python code a model folder or hub repository ships (off by default: such models are refused)"


def _port(value: str) -> int:
    number = _whole_number_or_text(value)
    if not isinstance(number, int) or not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {value!r}")
    return number


def cmd_serve(args: argparse.Namespace) -> int:
    from attnflows_panel.serve import serve

    serve(args.address, args.port, extra_origins=args.allow_websocket_origin, show=args.show)
    return 0


def _text_file_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-file", type=Path, metavar="FILE", help="read the input from this file instead of --text (a long document; truncated to the model's context with a warning)")
    parser.add_argument("--encoding", default="utf-8", help="of --text-file (default utf-8)")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``attnflows: error: …``, naming where the usage is (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"attnflows: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="attnflows", description="Analyse and compare attention in Transformer encoders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ft = sub.add_parser("finetune", help="fine-tune a model for classification or language modelling (cached)", description="Fine-tune an encoder or a decoder (GPT-2, LLaMA family) for sequence classification on the CPU, or a decoder's language-model head on the texts (--objective lm). Defaults: the bundled BERT on the bundled sentiment corpus (positive vs negative). The checkpoint is cached under $ATTNFLOWS_HOME/models.")
    ft.add_argument("--base", help="pre-trained model: hub name or local path (default: the bundled all-MiniLM-L6-v2 BERT)")
    ft.add_argument("--data", type=Path, help="CSV/JSONL with 'text' (or 'text_a' and 'text_b') and 'label' columns (default: bundled sentiment corpus)")
    ft.add_argument("--max-train", type=_positive_int, default=3000, help="at most this many training examples (default 3000)")
    ft.add_argument("--epochs", type=_positive_int, default=1, help="default 1")
    ft.add_argument("--batch-size", type=_positive_int, default=16, help="default 16")
    ft.add_argument("--learning-rate", type=_rate, default=1e-4, help="default 1e-4")
    ft.add_argument("--seed", type=int, default=0, help="default 0")
    ft.add_argument("--objective", choices=("classify", "lm"), default="classify", help="classify: a new classification head on the labels (default); lm: a decoder's language-model head on the texts, labels ignored")
    ft.add_argument("--force", action="store_true", help="fine-tune again even if a cached checkpoint matches")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.set_defaults(func=cmd_finetune)

    ex = sub.add_parser("extract", help="extract attention and head statistics for a corpus", description="Run a corpus through the model pair (or one model) and store attention and per-head statistics in a run directory. A stopped run resumes where it stopped.")
    ex.add_argument("corpus", nargs="?", type=Path, help="CSV/TSV/JSONL ('text' or 'text_a'+'text_b') or a text file with one sentence a line (default: held-out split of the bundled sentiment corpus)")
    ex.add_argument("--encoding", default="utf-8", help="the corpus file's text encoding (default utf-8; e.g. latin-1)")
    ex.add_argument("--output", "-o", type=Path, help="run directory (default: $ATTNFLOWS_HOME/runs/<corpus name>)")
    ex.add_argument("--pretrained", help="pre-trained model, hub name or path (default: bundled BERT)")
    ex.add_argument("--finetuned", help="fine-tuned model, hub name or path (default: the bundled BERT fine-tuned on sentiment, made if missing)")
    ex.add_argument("--model", help="extract with this one model instead of a pair")
    ex.add_argument("--limit", type=_positive_int, help="only the first N sentences")
    ex.add_argument("--shard-size", type=_positive_int, help="sentences per stored shard (default: the run's own when resuming, else 128)")
    ex.add_argument("--batch-size", type=_positive_int, default=32, help="largest forward batch (default 32)")
    ex.add_argument("--device", default="cpu", help="torch device (default cpu; on a cluster, a worker's $ATTNFLOWS_DEVICE overrides it)")
    ex.add_argument("--tau-min", type=_weight, default=0.1, help="store attention entries of at least this weight, in (0, 1] (default 0.1: a row keeps at most 10)")
    ex.add_argument("--workers", type=_positive_int, help="compute shards on a local Dask cluster of N worker processes")
    ex.add_argument("--scheduler", metavar="ADDRESS", help="compute shards on the Dask cluster of this scheduler (tcp://host:8786); the models' paths must exist on its workers")
    ex.add_argument("--overwrite", action="store_true", help="recompute a run directory that holds a run of other models, corpus or settings (by default it is kept and the command stops)")
    ex.add_argument("--verify", action="store_true", help="re-hash every finished shard before resuming (by default their sizes and times are checked)")
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    ex.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    ex.set_defaults(func=cmd_extract)

    info = sub.add_parser("info", help="show models, cache and stored runs", description="Show the default models, cached fine-tuned checkpoints and stored runs, or one run's manifest.")
    info.add_argument("run", nargs="?", type=Path, help="a run directory to describe")
    info.set_defaults(func=cmd_info)

    prep = sub.add_parser("prepare", help="make the default fine-tuned model and corpus run (once)", description="Fine-tune the default model and extract the held-out corpus with both models; cached, so a second call returns at once.")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=cmd_prepare)

    demo = sub.add_parser("demo", help="print what [CLS] attends to in both default models", description="Compare the default pre-trained and fine-tuned models on one input, in text.")
    demo.add_argument("--text", help="the sentence (default: the demo sentence)")
    _text_file_arguments(demo)
    demo.add_argument("--text-pair", help="optional second segment")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    exp = sub.add_parser("export", help="write a self-contained HTML dashboard for one input", description="Compare the pre-trained and fine-tuned models on one input (or show one model's attention, --model) in a single HTML file that opens offline: select heads in the grid and the trace from [CLS] (a decoder's last token) is recomputed in the browser.")
    exp.add_argument("--text", help="the sentence (default: the demo sentence)")
    _text_file_arguments(exp)
    exp.add_argument("--text-pair", help="optional second segment")
    exp.add_argument("--output", "-o", type=Path, required=True, help="the HTML file to write (its directory must exist)")
    exp.add_argument("--pretrained", help="pre-trained model, hub name or path (default: bundled BERT)")
    exp.add_argument("--finetuned", help="fine-tuned model, hub name or path (default: the bundled BERT fine-tuned on sentiment, made if missing)")
    exp.add_argument("--model", help="export one model instead of a pair: hub name or path (its grid shows each head's largest weight)")
    exp.add_argument("--tau", type=float, default=0.1, help="keep attention edges of at least this weight, in (0, 1] (default 0.1)")
    exp.add_argument("--alpha", type=float, default=0.5, help="weight of deeper influence, in [0, 1] (default 0.5)")
    exp.add_argument("--top-heads", type=int, default=4, help="show the matrices of this many heads the models differ most on (one model: of largest weight), 0 to 8 (default 4)")
    exp.add_argument("--top-k", type=_whole_number_or_text, default=3, metavar="K", help="CLS trace: keep the K strongest edges of each token, 0 to 20; 0 keeps every edge of at least tau (default 3, as in the app)")
    exp.add_argument("--device", default="cpu", help="torch device (default cpu)")
    exp.add_argument("--quiet", action="store_true", help="no progress bars")
    exp.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    exp.set_defaults(func=cmd_export)

    srv = sub.add_parser("serve", help="serve the dashboards (loopback only unless asked)", description="Serve the comparison dashboard (/compare) and the one-model dashboard (/single). Listens on 127.0.0.1 unless --address says otherwise; browsers are accepted only from the served address.")
    srv.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    srv.add_argument("--port", type=_port, default=5006, help="default 5006")
    srv.add_argument("--allow-websocket-origin", action="append", default=[], metavar="HOST[:PORT]", help="another host name browsers may reach the server by (repeatable)")
    srv.add_argument("--show", action="store_true", help="open a browser tab")
    srv.set_defaults(func=cmd_serve)
    return parser


def _show_warning(message: Any, category: type[Warning], *_: Any, **__: Any) -> None:
    from attnflows_panel.corpus import LabelSummary

    print(f"attnflows: {'' if issubclass(category, LabelSummary) else 'warning: '}{message}", file=sys.stderr)  # a label summary informs


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and return 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=FutureWarning)
    if getattr(args, "quiet", False):
        from attnflows_panel.corpus import LabelSummary

        warnings.filterwarnings("ignore", category=LabelSummary)
    try:
        if args.func is not cmd_info:  # info only reads the cache: importing transformers would be most of its time
            _quiet_transformers()
        return int(args.func(args))
    except (AttnflowsError, InputError) as exc:
        print(f"attnflows: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnflows: interrupted; finished work is kept and a rerun continues from it", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI promises no tracebacks
        if os.environ.get("ATTNFLOWS_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"attnflows: unexpected error: {type(exc).__name__}: {message} (set ATTNFLOWS_DEBUG=1 for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
