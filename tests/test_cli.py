"""The attnflows command: help for every command, one-line errors, real work on tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnflows_panel.cli import main
from attnflows_panel.store import RunStore


@pytest.mark.parametrize("command", [[], ["finetune"], ["extract"], ["info"], ["prepare"], ["demo"], ["serve"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: attnflows" in capsys.readouterr().out


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "attnflows_panel.cli", *args], capture_output=True, text=True, timeout=300)


LIBRARIES_IMPORTED = """
import sys
from attnflows_panel.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("imported:", *sorted({"torch", "transformers", "holoviews", "panel"} & sys.modules.keys()))
"""


def libraries_imported(*args: str, env: dict[str, str] | None = None) -> str:
    """Which of the slow libraries to import a command imported, run in a fresh interpreter (with ``env``, when given)."""
    result = subprocess.run([sys.executable, "-c", LIBRARIES_IMPORTED, *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("command", [["--help"], ["extract", "--help"], ["export", "--help"], ["info"]])
def test_a_command_that_loads_no_model_imports_no_slow_library(command: list[str]) -> None:
    assert libraries_imported(*command) == "imported:"


def test_an_export_from_a_shipped_or_saved_page_template_imports_neither_holoviews_nor_panel(tiny_dir: Path, tmp_path: Path) -> None:
    args = ["export", "--model", str(tiny_dir), "--text", "the car was good", "--quiet", "--output"]
    env = {**os.environ, "ATTNFLOWS_HOME": str(tmp_path / "home")}  # no page template saved yet
    shipped = libraries_imported(*args, str(tmp_path / "shipped.html"), env=env)  # the default page: its template ships with the package
    assert "holoviews" not in shipped and "panel" not in shipped and (tmp_path / "shipped.html").stat().st_size > 0
    assert "holoviews" in libraries_imported(*args, str(tmp_path / "page.html"), "--top-heads", "3", env=env)  # not shipped: rendered once, saved
    again = libraries_imported(*args, str(tmp_path / "again.html"), "--top-heads", "3", env=env)
    assert "holoviews" not in again and "panel" not in again and (tmp_path / "again.html").stat().st_size > 0


def test_a_reused_checkpoint_is_reported_without_importing_torch(tiny_dir: Path, sentiment_csv: Path) -> None:
    args = ["finetune", "--base", str(tiny_dir), "--data", str(sentiment_csv), "--quiet", "--batch-size", "32", "--seed", "1"]
    assert main(args) == 0
    assert libraries_imported(*args) == "imported: transformers"  # only to quiet its logging


def test_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,sentiment\nhello,positive\n")
    result = run_cli("finetune", "--data", str(bad), "--quiet")
    assert result.returncode == 2
    assert result.stderr.strip() == "attnflows: error: bad.csv needs a 'text' column (or 'text_a' and 'text_b'); found: sentence, sentiment"
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("afile/sub", "cannot make the run directory {tmp}/afile/sub: {tmp}/afile is not a directory"),
        ("afile", "output path exists and is not a directory: {tmp}/afile"),
        ("full", "output directory is not empty and is not an attnflows run: {tmp}/full"),
    ],
)
def test_an_output_that_cannot_hold_a_run_is_refused_before_any_model_loads(output: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the car\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    args = ["extract", str(corpus), "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / output), "--quiet"]
    assert main(args) == 2  # the output is refused first: the model path, wrong too, is never reached
    assert capsys.readouterr().err.strip() == f"attnflows: error: {message.format(tmp=tmp_path)}"


def test_a_run_directory_the_file_system_refuses_is_one_line(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the car\n")
    assert main(["extract", str(corpus), "--model", str(tiny_dir), "-o", "/proc/attnflows-run", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "attnflows: error: cannot make the run directory /proc/attnflows-run: No such file or directory"


@pytest.mark.parametrize("command", ["extract", "export"])
def test_one_model_and_a_pair_are_not_both_given(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the car\n")
    what = [str(corpus), "-o", str(tmp_path / "run")] if command == "extract" else ["--text", "the car", "-o", str(tmp_path / "r.html")]
    assert main([command, *what, "--model", "m", "--finetuned", "f", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "attnflows: error: give --model for one model, or --pretrained/--finetuned for a pair, not both"
    assert list(tmp_path.iterdir()) == [corpus]  # no run directory, no page


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--tau", "0", "tau must be in (0, 1], got 0.0"), ("--alpha", "1.5", "alpha must be in [0, 1], got 1.5"), ("--top-heads", "9", "the number of top heads must be a whole number from 0 to 8, got 9")],
)
def test_a_bad_export_setting_names_its_flag(flag: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--text", "the car", "-o", str(tmp_path / "r.html"), flag, value, "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"attnflows: error: argument {flag}: {message} (see attnflows export --help)"
    assert list(tmp_path.iterdir()) == []


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the car\n")
    assert main(["extract", str(corpus), "--model", str(tmp_path / "none"), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"attnflows: error: model path does not exist: {tmp_path / 'none'}"
    assert not (tmp_path / "run").exists()


def test_bad_flag_value_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "--limit", "-3"])
    assert exit_info.value.code == 2
    assert "expected a number of at least 1, got -3" in capsys.readouterr().err


def test_extract_and_info_with_a_tiny_pair(tiny_dir: Path, tiny_classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "the car was good"}\n{"text": "i hate it"}\n{"text": "a great movie"}\n')
    run = tmp_path / "run"
    args = ["extract", str(corpus), "--pretrained", str(tiny_dir), "--finetuned", str(tiny_classifier_dir), "-o", str(run), "--quiet"]
    assert main(args) == 0
    assert "3 of 3 sentences, models pretrained, finetuned" in capsys.readouterr().out
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert '"n_sentences": 3' in out and "stored: 3 of 3 sentences" in out


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--tau-min", "0"], "argument --tau-min: expected a number in (0, 1], got '0'"),
        (["--tau-min", "x"], "argument --tau-min: expected a number in (0, 1], got 'x'"),
        (["--workers", "0"], "argument --workers: expected a number of at least 1, got 0"),
    ],
)
def test_extract_refuses_bad_store_and_cluster_flags(flags: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"attnflows: error: {error} (see attnflows extract --help)"]


def test_extract_names_an_unreachable_scheduler_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the car\n")
    args = ["extract", str(corpus), "--model", str(tmp_path / "none"), "-o", str(tmp_path / "run"), "--quiet"]
    assert main([*args, "--scheduler", "tcp://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err.startswith("attnflows: error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert main([*args, "--scheduler", "tcp://127.0.0.1:9", "--workers", "2"]) == 2
    assert capsys.readouterr().err.strip() == "attnflows: error: give --scheduler or --workers, not both"
    for address, error in [("", "--scheduler needs an address, for example tcp://127.0.0.1:8786"), ("nonsense", "--scheduler 'nonsense' is not a scheduler address: give host:port, for example tcp://127.0.0.1:8786")]:
        assert main(["extract", str(tmp_path / "missing.csv"), "--scheduler", address]) == 2  # before the corpus is read
        assert capsys.readouterr().err.strip() == f"attnflows: error: {error}"
    assert main(["extract", str(tmp_path / "missing.csv"), "--workers", "2", "--trust-remote-code"]) == 2
    assert capsys.readouterr().err.strip() == "attnflows: error: --trust-remote-code runs a model's own code in this process only: leave out --workers and --scheduler (Dask workers never run it)"
    assert not (tmp_path / "run").exists()


def test_extract_keeps_a_run_of_other_settings_unless_overwrite(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.csv"
    corpus.write_text("text,label\nthe car was good,pos\ni hate it,neg\n")
    args = ["extract", str(corpus), "--model", str(tiny_dir), "-o", str(tmp_path / "run")]
    assert main(args) == 0
    assert "c.csv: 2 rows, 2 labels" in capsys.readouterr().err
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().err.splitlines() == ["attnflows: run: 2 of 2 sentences already stored (1 shard, sizes and times checked); nothing to do"]
    assert main([*args, "--quiet", "--tau-min", "0.2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"attnflows: error: {tmp_path / 'run'} holds a run of other settings (tau_min 0.1, now 0.2); pass --overwrite (overwrite=True) to recompute it, or choose another output directory"
    )
    assert RunStore.open(tmp_path / "run").tau_min == 0.1
    assert main([*args, "--quiet", "--tau-min", "0.2", "--overwrite"]) == 0
    assert RunStore.open(tmp_path / "run").tau_min == 0.2


@pytest.mark.slow
def test_extract_on_two_local_workers(tiny_dir: Path, tiny_classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("the car was good\ni hate it\na great movie\nvery bad\n")
    models = ["--pretrained", str(tiny_dir), "--finetuned", str(tiny_classifier_dir), "--shard-size", "2", "--quiet"]
    assert main(["extract", str(corpus), *models, "-o", str(tmp_path / "run"), "--workers", "2", "--tau-min", "0.2"]) == 0
    assert "4 of 4 sentences" in capsys.readouterr().out
    store = RunStore.open(tmp_path / "run")
    assert store.tau_min == 0.2 and len(store.manifest["shards"]) == 2


def test_finetune_command(tiny_dir: Path, sentiment_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["finetune", "--base", str(tiny_dir), "--data", str(sentiment_csv), "--quiet", "--batch-size", "32"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "fine-tuned in" in first and "held-out accuracy" in first
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("reused cached checkpoint")
    assert main(["info"]) == 0
    assert "fine-tuned:" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["-1", "21", "1.5", "three", ""])
def test_export_refuses_a_bad_top_k_in_one_line(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert main(["export", "--top-k", value, "-o", str(out), "--quiet"]) == 2  # refused before any model loads
    shown = int(value) if value.lstrip("-").isdigit() else repr(value)
    assert capsys.readouterr().err.splitlines() == [f"attnflows: error: argument --top-k: top k must be a whole number from 0 to 20 (0: every edge of at least tau), got {shown} (see attnflows export --help)"]
    assert list(tmp_path.iterdir()) == []


def test_export_help_names_top_k_next_to_top_heads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--top-heads TOP_HEADS" in out and "--top-k K" in out and "(default 3, as in the app)" in out


@pytest.mark.parametrize(("value", "setting"), [("0", "top k = 0 (every edge of at least tau)"), ("1", "top k = 1 (strongest edges kept per token)")])
def test_export_with_top_k(value: str, setting: str, tiny_dir: Path, tiny_classifier_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from attnflows_panel.analysis.flows import trace_cls_flow
    from attnflows_panel.extract import extract_pair
    from attnflows_panel.models import ModelPair, load_encoder

    out = tmp_path / "r.html"
    text = "the car was good and i love it"
    args = ["export", "--pretrained", str(tiny_dir), "--finetuned", str(tiny_classifier_dir), "--text", text, "--top-k", value, "--top-heads", "0", "-o", str(out), "--quiet"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(f"{out}: ")
    page = out.read_text(encoding="utf-8")
    assert setting in page
    records = extract_pair(ModelPair(load_encoder(tiny_dir), load_encoder(tiny_classifier_dir)), text)
    edges = {int(i) for r in records for i in trace_cls_flow(r.attention, top_k=int(value) or None).edge_ids()}
    assert f"pre-trained vs fine-tuned from [CLS]: {len(edges)} edges (" in page
    assert ("weaker hidden (top 1 per token)" in page) == (value == "1")


def test_info_on_a_foreign_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert "not an attnflows run directory" in capsys.readouterr().err


def test_extract_reads_a_corpus_in_the_encoding_asked_for(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "fr.txt"
    corpus.write_bytes("un film na\u00efve\n".encode("latin-1"))
    assert main(["extract", str(corpus), "--model", str(tiny_dir), "-o", str(tmp_path / "refused"), "--quiet"]) == 2
    assert "fr.txt line 1 is not valid utf-8" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main(["extract", str(corpus), "--model", str(tiny_dir), "-o", str(tmp_path / "run"), "--encoding", "latin-1", "--quiet"]) == 0
    assert RunStore.open(tmp_path / "run").sentences()["text"].tolist() == ["un film na\u00efve"]


def test_export_one_model_from_a_text_file(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "review.txt"
    text.write_text("the car was good\n\nand i love it, " * 3, encoding="utf-8")
    out = tmp_path / "one.html"
    assert main(["export", "--model", str(tiny_dir), "--text-file", str(text), "-o", str(out), "--quiet"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "<title>attnflows: attention flows</title>" in page and "the car was good" in page
    assert capsys.readouterr().out.startswith(f"{out}: ")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--text", "hi", "--text-file", "{text}"], "give --text or --text-file, not both"),
        (["--text-file", "{missing}"], "text file does not exist: {missing}"),
        (["--text-file", "{latin}"], "latin.txt line 1 is not valid utf-8: byte 0xe9 at byte offset 3; pass the file's encoding (for example --encoding latin-1, or encoding='latin-1' in Python)"),
        (["--text-file", "{blank}"], "--text-file blank.txt is empty: give a file with the text to export"),
        (["--model", "{model}", "--pretrained", "{model}"], "give --model for one model, or --pretrained/--finetuned for a pair, not both"),
    ],
)
def test_export_input_errors_are_one_line_and_write_nothing(args: list[str], error: str, tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {"text": tmp_path / "text.txt", "missing": tmp_path / "missing.txt", "latin": tmp_path / "latin.txt", "blank": tmp_path / "blank.txt", "model": tiny_dir}
    files["text"].write_text("the car", encoding="utf-8")
    files["latin"].write_bytes("caf\u00e9".encode("latin-1"))
    files["blank"].write_text("\u200b \n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export", *(a.format(**files) for a in args), "-o", str(out / "x.html"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"attnflows: error: {error.format(**files)}"
    assert list(out.iterdir()) == []


def test_export_reads_a_text_file_in_the_encoding_asked_for(tiny_dir: Path, tmp_path: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("the caf\u00e9 was good".encode("latin-1"))
    out = tmp_path / "latin.html"
    assert main(["export", "--model", str(tiny_dir), "--text-file", str(latin), "--encoding", "latin-1", "-o", str(out), "--quiet"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "the caf\\u00e9 was good" in page or "the caf\u00e9 was good" in page  # Bokeh's JSON may escape it
