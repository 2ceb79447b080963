"""The example notebook: stored clean, and run top to bottom in a real kernel on the real pair."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "attention_flows.ipynb"
# Panel 1.9 displays a pane as this mime bundle next to text/html that embeds the Bokeh document
HOLOVIEWS_EXEC = "application/vnd.holoviews_exec.v0+json"


def cell_with(nb: nbformat.NotebookNode, snippet: str) -> nbformat.NotebookNode:
    """The one code cell whose source contains ``snippet``."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    return cell


def stream_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def rendered_html(cell: nbformat.NotebookNode) -> str:
    """The HTML of the cell's Panel output; fails unless it is a rendered Bokeh document."""
    (html,) = [o.data["text/html"] for o in cell.outputs if HOLOVIEWS_EXEC in o.get("data", {})]
    assert "docs_json" in html
    return html


def test_notebook_is_stored_clean() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    (params,) = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert re.search(r"^PRETRAINED = None$", params.source, re.M) and re.search(r"^FINETUNED = None$", params.source, re.M)
    assert re.search(r'^TEXT = ".+"$', params.source, re.M)


@pytest.mark.integration
@pytest.mark.slow
def test_notebook_runs_on_the_real_pair(small_finetune, attnflows_home: Path) -> None:
    from nbclient import NotebookClient

    from attnflows_panel.models import default_pretrained_path

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = f"PRETRAINED = {str(default_pretrained_path())!r}\nFINETUNED = {str(small_finetune.path)!r}\nimport sys\nprint(sys.executable)"
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    env = {**os.environ, "ATTNFLOWS_HOME": str(attnflows_home), "HF_HUB_OFFLINE": "1"}
    # jupyter_client starts the "python3" kernel (argv "python") with this interpreter: the project venv
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute(env=env)

    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert stream_text(nb.cells[at + 1]).strip() == sys.executable
    # pn.extension(inline=True): the JavaScript is in the outputs, and no loader points at a CDN
    outputs = "".join(str(v) for c in nb.cells if c.cell_type == "code" for o in c.outputs for v in o.get("data", {}).values())
    assert "Bokeh.set_log_level" in outputs and "cdn.bokeh.org" not in outputs and "cdn.holoviz.org" not in outputs
    assert f"fine-tuned: {small_finetune.path}" in stream_text(cell_with(nb, "load_encoder(pretrained)"))

    # the view renders all five parts; its flow title counts the edges the notebook prints for all heads
    view_html = rendered_html(cell_with(nb, "view = CompareView(pair, TEXT)"))
    for glyph in ("Rect", "Segment", "Scatter", "Image", "Text"):
        assert f'"name":"{glyph}"' in view_html
    counts = re.search(r"(\d+) edges with all heads, (\d+) with the 6 selected heads", stream_text(cell_with(nb, "view.select_heads(top)")))
    assert counts is not None
    all_heads, selected = map(int, counts.groups())
    assert 0 < selected < all_heads
    assert f"pre-trained vs fine-tuned: CLS trace from [CLS] (layer 6), {all_heads} edges" in view_html

    figure_html = rendered_html(cell_with(nb, "flow_diagram(pre.tokens, traces"))
    assert f"[CLS] traces through the selected heads ({selected} edges)" in figure_html
    assert '"name":"Segment"' in figure_html and '"name":"Image"' in figure_html

    ablation = re.findall(r"^\s*(\d+) heads off: prediction (stays|changes): (\w+) \(\d+\.\d%\) -> (\w+) \(\d+\.\d%\)$", stream_text(cell_with(nb, "ablate_heads(")), re.M)
    assert [int(a[0]) for a in ablation] == [6, 12]
    for _, verdict, before, after in ablation:
        assert {before, after} <= {"negative", "positive"}
        assert (verdict == "changes") == (before != after)

    table = stream_text(cell_with(nb, "depth_trend(")).splitlines()
    assert table[0].split() == ["layer", "js_mean", "js_max", "cosine_mean"]
    rows = [line.split() for line in table[1:7]]
    assert [int(r[0]) for r in rows] == list(range(6))
    assert all(0.0 <= float(r[1]) <= float(r[2]) <= 1.0 and 0.0 < float(r[3]) <= 1.0 for r in rows)
    assert re.fullmatch(r"Spearman rho\(layer, mean JS\) = -?\d\.\d\d", table[7])
