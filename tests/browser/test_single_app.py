"""``panel serve apps/single.py`` in a real browser: the default model's view, and a bad model path reported in place."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_single_app_serves_the_default_model_reports_a_bad_path_and_loads_another(page, serve_app_file, small_finetune, artifacts: Path) -> None:
    url = serve_app_file("single")
    msgs: list = []
    page.on("console", lambda message: msgs.append(message))
    page.set_viewport_size({"width": 1500, "height": 1500})
    page.goto(url)
    page.wait_for_selector("text=Load model", timeout=30_000)
    page.wait_for_selector(".bk-events", timeout=90_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(artifacts / "single-app.png"), full_page=True)
    chooser = page.get_by_placeholder("e.g. /path/to/checkpoint")
    chooser.fill("/no/such/model")
    chooser.press("Enter")
    page.get_by_role("button", name="Load model").click()
    page.wait_for_selector("text=model path does not exist: /no/such/model", timeout=30_000)
    assert page.locator(".bk-events").count() >= 3  # the default model's plots are still there
    chooser.fill(str(small_finetune.path))
    page.get_by_role("button", name="Load model").click()
    page.wait_for_selector("text=6 layers × 12 heads", timeout=60_000)
    page.wait_for_selector("text=Switch selected heads off", timeout=60_000)
    assert "Traceback" not in page.content()
    assert [m.text for m in msgs if m.type == "error"] == []
