"""Hostile inputs: each is refused with one line (an InputError/ModelError, or exit code 2) and leaves nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from attnflows_panel.cli import main
from attnflows_panel.errors import InputError, ModelError
from attnflows_panel.export import export_dashboard
from attnflows_panel.extract import encode, extract, extract_pair, forward_attention
from attnflows_panel.models import load_encoder


class CallsOnLoad:
    """Unpickles by calling a function: what torch's weights_only loader must refuse."""

    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _save_state_dict(folder: Path, state: dict) -> None:
    from safetensors.torch import save_file

    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _pickle_checkpoint(folder: Path) -> None:
    import torch

    (folder / "model.safetensors").unlink()
    torch.save({"weights": CallsOnLoad()}, folder / "pytorch_model.bin")


def _random_pickle(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(np.random.default_rng(0).bytes(4096))


def _truncated_safetensors(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _truncated_pickle(folder: Path) -> None:
    import torch

    torch.save(_state_dict(folder), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])


def _mismatched_shapes(folder: Path) -> None:
    import torch

    state = _state_dict(folder)
    state[next(k for k in state if k.endswith("query.weight"))] = torch.zeros(3, 3)
    _save_state_dict(folder, state)


def _nan_weights(folder: Path) -> None:
    state = _state_dict(folder)
    state["embeddings.word_embeddings.weight"][0, 0] = float("nan")
    _save_state_dict(folder, state)


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def _empty_vocabulary(folder: Path) -> None:
    _no_tokenizer(folder)
    (folder / "vocab.txt").write_text("")


def _too_many_tokens(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"extra{i}" for i in range(5)])
    tokenizer.save_pretrained(folder)


HOSTILE_MODELS: dict[str, tuple[Callable[[Path], None], str]] = {
    "pickle with __reduce__": (_pickle_checkpoint, r"weights_only refused the pickle checkpoint \(.*getcwd.*\); convert it to safetensors$"),
    "random pickle bytes": (_random_pickle, r"weights_only refused the pickle checkpoint \(.+\); convert it to safetensors$"),
    "truncated pytorch_model.bin": (_truncated_pickle, r"its pytorch_model\.bin is truncated or not a torch checkpoint \(.+\)$"),
    "truncated safetensors": (_truncated_safetensors, r"model\.safetensors is truncated or not a safetensors file \(.+\)$"),
    "random safetensors": (lambda f: (f / "model.safetensors").write_bytes(np.random.default_rng(1).bytes(5000)), r"model\.safetensors is truncated or not a safetensors file"),
    "empty safetensors": (lambda f: (f / "model.safetensors").write_bytes(b""), r"model\.safetensors is truncated or not a safetensors file"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), r"no file named model\.safetensors"),
    "config not json": (lambda f: (f / "config.json").write_text("{not json"), r"config\.json' is not a valid JSON file"),
    "config a list": (lambda f: (f / "config.json").write_text("[1, 2]"), r"Should have a `model_type` key"),
    "unknown model type": (lambda f: _edit_config(f, model_type="no-such-type"), r"model type `no-such-type` but Transformers does not recognize"),
    "heads do not divide": (lambda f: _edit_config(f, num_attention_heads=5), r"hidden size \(32\) is not a multiple of the number of attention heads \(5\)"),
    "zero layers": (lambda f: _edit_config(f, num_hidden_layers=0), r"has no layers \(num_hidden_layers is 0"),
    "mismatched shapes": (_mismatched_shapes, r"its weights do not have the shapes its config\.json gives$"),
    "nan weights": (_nan_weights, r"NaN or infinite weights in embeddings\.word_embeddings\.weight"),
    "tokenizer.json not json": (lambda f: (f / "tokenizer.json").write_text("{bad"), r"^cannot load the tokenizer of model .*: Expecting property name"),
    "no tokenizer": (_no_tokenizer, r"has no tokenizer vocabulary"),
    "empty vocabulary": (_empty_vocabulary, r"^cannot load the tokenizer of model .*: WordPiece error: Missing \[UNK\]"),
    "more tokens than embeddings": (_too_many_tokens, r"has \d+ tokens but the model embeds only \d+$"),
}


@pytest.fixture(scope="module")
def hostile(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``hostile(kind)``: a copy of the tiny model folder broken as ``HOSTILE_MODELS[kind]`` says (made once)."""
    made: dict[str, Path] = {}

    def folder(kind: str) -> Path:
        if kind not in made:
            made[kind] = shutil.copytree(tiny_dir, tmp_path_factory.mktemp("hostile") / "model")
            HOSTILE_MODELS[kind][0](made[kind])
        return made[kind]

    return folder


def one_line(message: str) -> str:
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.mark.parametrize("kind", list(HOSTILE_MODELS))
def test_hostile_model_folder_is_a_one_line_model_error(kind: str, hostile: Callable[[str], Path]) -> None:
    folder = hostile(kind)
    before = sorted(folder.iterdir())
    with pytest.raises(ModelError) as info:
        load_encoder(folder)
    assert re.search(HOSTILE_MODELS[kind][1], one_line(str(info.value))), str(info.value)
    assert "Traceback" not in str(info.value) and len(str(info.value)) < 400
    assert sorted(folder.iterdir()) == before


@pytest.mark.parametrize(
    ("text", "text_pair", "message"),
    [
        ("", None, "text is empty"),
        ("\u200b\u200c\u200d\ufeff", None, "text is empty"),
        ("\x00\x00\x00", None, "text is empty"),
        ("\x01 \x7f\t\n\u00ad", None, "text is empty"),
        ("caf\ud800", None, "text has an invalid character at position 3 (a lone surrogate, U+D800)"),
        ("\udfff and more", None, "text has an invalid character at position 0 (a lone surrogate, U+DFFF)"),
        ("fine", "\u200b", "second segment is empty"),
        ("fine", "ok\ud83d", "second segment has an invalid character at position 2 (a lone surrogate, U+D83D)"),
        (b"bytes", None, "text must be a string, got bytes"),
        (None, None, "text must be a string, got NoneType"),
    ],
)
def test_hostile_text_is_a_one_line_input_error(tiny, text: object, text_pair: str | None, message: str) -> None:
    with pytest.raises(InputError) as info:
        extract(tiny, None, text, text_pair)  # type: ignore[arg-type]
    assert one_line(str(info.value)) == message


def test_typed_special_tokens_are_text(tiny) -> None:
    record = extract(tiny, None, "[CLS] [SEP] [MASK] [PAD] [unk] hi", "[SEP]")
    assert record.tokens[:5] == ["[CLS]", "[UNK]", "c", "##l", "##s"]  # the tiny vocabulary has no brackets
    assert [t for t, special in zip(record.tokens, record.special_mask, strict=True) if special] == ["[CLS]", "[SEP]", "[SEP]"]
    assert np.flatnonzero(record.cls_mask).tolist() == [0]
    assert np.flatnonzero(record.sep_mask).tolist() == [record.tokens.index("[SEP]"), record.n_tokens - 1]
    assert record.tokens.count("[SEP]") == 2 and "[MASK]" not in record.tokens and "[PAD]" not in record.tokens


def test_typed_special_tokens_split_into_word_pieces(default_pretrained) -> None:
    record = extract(default_pretrained, None, "[CLS] hi [MASK]")
    assert record.tokens == ["[CLS]", "[", "cl", "##s", "]", "hi", "[", "mask", "]", "[SEP]"]
    assert record.special_mask.sum() == 2


@pytest.fixture
def no_pad(tiny_dir: Path):
    """The tiny model with a tokenizer that has no pad token."""
    lm = load_encoder(tiny_dir)
    lm.tokenizer.pad_token = None
    assert lm.tokenizer.pad_token_id is None
    return lm


def test_batch_without_pad_token_pads_with_another_special_token(no_pad) -> None:
    texts = ["the car", "a very good movie and a great film", "i love it"]
    batched = forward_attention(no_pad, [encode(no_pad, t) for t in texts])
    for text, (attention, _) in zip(texts, batched, strict=True):
        np.testing.assert_allclose(attention, extract(no_pad, None, text).attention, atol=1e-6)


def test_batch_without_any_special_token_is_a_model_error(no_pad) -> None:
    encodings = [encode(no_pad, "the car"), encode(no_pad, "a good movie")]
    for attribute in ("sep_token", "eos_token", "unk_token", "cls_token"):
        setattr(no_pad.tokenizer, attribute, None)
    with pytest.raises(ModelError) as info:
        forward_attention(no_pad, encodings)
    assert one_line(str(info.value)).endswith("has no pad token nor any other special token to pad a batch with")


@pytest.mark.parametrize(
    ("given", "options", "message"),
    [
        ("none", {}, "nothing to export: no sentence has been run through the models"),
        ("three", {}, "need the (pre-trained, fine-tuned) records of one input, or one model's record, got 3 records"),
        ("two inputs", {}, "the two records tokenize the input differently; export the records of one input through one pair"),
        ("pair", {"tau": 5.0}, "tau must be in (0, 1], got 5.0"),
        ("pair", {"tau": float("nan")}, "tau must be in (0, 1], got nan"),
        ("pair", {"alpha": -0.5}, "alpha must be in [0, 1], got -0.5"),
        ("pair", {"top_heads": 99}, "the number of top heads must be a whole number from 0 to 8, got 99"),
        ("pair", {"top_k": "3"}, "top k must be a whole number from 0 to 20 (0: every edge of at least tau), got '3'"),
        ("pair", {"path": "missing/report.html"}, "cannot write the dashboard to {tmp}/missing/report.html: directory {tmp}/missing does not exist"),
        ("pair", {"path": ""}, "cannot write the dashboard to {tmp}: it is a directory; name an .html file"),
        ("pair", {"path": "re\0port.html"}, "cannot write the dashboard to '{tmp}/re\\x00port.html': a path cannot contain a NUL character"),
    ],
)
def test_hostile_export_is_a_one_line_input_error_and_writes_nothing(given: str, options: dict, message: str, tiny_pair, tmp_path: Path) -> None:
    pre, fine = extract_pair(tiny_pair, "the car was good")
    records = {"none": None, "three": [pre, fine, pre], "two inputs": [pre, extract_pair(tiny_pair, "a film is bad")[1]], "pair": [pre, fine]}[given]
    options = {"path": "report.html", **options}
    with pytest.raises(InputError) as info:
        export_dashboard(records, tmp_path / options.pop("path"), **options)
    assert one_line(str(info.value)) == message.format(tmp=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- the command line, in-process (fast): exit code 2, one line on stderr, no run directory or report left


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["the car", "\u200b\u200d", "a movie"], "c.txt line 2 is empty"),
        (["the car", "\x01\x02\x03"], "c.txt line 2 is empty"),
        (["\ufeff\ufeff", "the car"], "c.txt line 1 is empty"),
        (["the car", "", "  ", "\u200b"], "c.txt line 4 is empty"),  # the line, not the sentence (blank lines are skipped)
    ],
)
def test_cli_extract_refuses_invisible_sentences(lines: list[str], message: str, tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["extract", str(corpus), "--model", str(tiny_dir), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    assert one_line(capsys.readouterr().err.strip()) == f"attnflows: error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "\u200b\u200c"], "--text is empty: give the sentence to export"),
        (["--text", "caf\udcff"], "--text has an invalid character at position 3 (a lone surrogate, U+DCFF)"),
        (["--text", "fine", "--text-pair", "\ufeff"], "--text-pair is empty: leave it out for a single sentence"),
        (["--text", "fine", "--text-pair", "\udce9t\u00e9"], "--text-pair has an invalid character at position 0 (a lone surrogate, U+DCE9)"),
    ],
)
def test_cli_export_refuses_hostile_text(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", *args, "-o", str(tmp_path / "r.html"), "--quiet"]) == 2
    assert one_line(capsys.readouterr().err.strip()) == f"attnflows: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_cli_extract_refuses_a_lone_surrogate_in_a_jsonl_corpus(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "the car"}\n{"text": "caf\\ud800 au lait"}\n')  # JSON's escape makes the lone surrogate
    assert main(["extract", str(corpus), "--model", str(tiny_dir), "-o", str(tmp_path / "run"), "--quiet"]) == 2
    expected = "attnflows: error: c.jsonl, sentence 2 has an invalid character at position 3 (a lone surrogate, U+D800)"
    assert one_line(capsys.readouterr().err.strip()) == expected
    assert not (tmp_path / "run").exists()


# ---- the command line as users run it (a subprocess each, about 5 s, so only these)

# (command, extra arguments, hostile model folder or None, the error line after "attnflows: error: " as a regex)
CLI_CASES = [
    ("export", ["--text", b"caf\xff"], None, r"--text has an invalid character at position 3 \(a lone surrogate, U\+DCFF\)"),
    ("export", ["--text", "\u200b\u200b\u200b"], None, r"--text is empty: give the sentence to export"),
    ("export", ["--text", "\x01\x02 \x1f"], None, r"--text is empty: give the sentence to export"),
    ("export", ["--text", "the car"], "pickle with __reduce__", r"cannot load model '.*': weights_only refused the pickle checkpoint \(.*getcwd.*\); convert it to safetensors"),
    ("export", ["--text", "the car"], "truncated safetensors", r"cannot load model '.*': model\.safetensors is truncated or not a safetensors file \(.+\)"),
    ("export", ["--text", "the car"], "nan weights", r"model '.*' has NaN or infinite weights in .+; its checkpoint is broken"),
    ("extract", [], "random safetensors", r"cannot load model '.*': model\.safetensors is truncated or not a safetensors file \(.+\)"),
    ("extract", [], "pickle with __reduce__", r"cannot load model '.*': weights_only refused the pickle checkpoint \(.+\); convert it to safetensors"),
    ("extract", [], "empty vocabulary", r"cannot load the tokenizer of model '.*': WordPiece error: .+"),
    ("extract", [], "zero layers", r"model '.*' has no layers \(num_hidden_layers is 0 in its config\.json\)"),
]


@pytest.mark.parametrize(("command", "args", "kind", "message"), CLI_CASES, ids=[f"{c[0]}-{c[2] or c[3][:20]}" for c in CLI_CASES])
def test_cli_subprocess_error_is_one_line_exit_2_and_writes_nothing(command: str, args: list, kind: str | None, message: str, hostile: Callable[[str], Path], tiny_dir: Path, tiny_classifier_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    if command == "export":
        pretrained = hostile(kind) if kind else tiny_dir
        argv = [command, *args, "--pretrained", str(pretrained), "--finetuned", str(tiny_classifier_dir), "-o", str(out), "--quiet"]
    else:
        (work / "c.txt").write_text("the car\na good movie\n")
        argv = [command, str(work / "c.txt"), "--model", str(hostile(kind)), "-o", str(out), "--quiet"]
    argv = [os.fsencode(a) if isinstance(a, str | Path) else a for a in argv]
    result = subprocess.run([os.fsencode(sys.executable), b"-m", b"attnflows_panel.cli", *argv], capture_output=True, timeout=300, cwd=work)
    stderr = result.stderr.decode("utf-8", "backslashreplace").strip()
    assert result.returncode == 2, stderr
    assert re.fullmatch("attnflows: error: " + message, one_line(stderr)), stderr
    assert result.stdout == b""
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == (["c.txt"] if command == "extract" else [])
