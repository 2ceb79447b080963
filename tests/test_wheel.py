"""The built wheel, installed in a fresh venv (not editable), serves the apps and writes an export."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding only the wheel; its dependencies are read from this venv's site-packages (where no attnflows is importable)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(REPO)], check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    packages = next((root / "venv" / "lib").glob("python*/site-packages"))
    (packages / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # a plain path: the editable install's own .pth is not read
    wheel = next((root / "dist").glob("attnflows*.whl"))
    subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=600)
    return root / "venv" / "bin"


@pytest.mark.slow
def test_the_wheel_is_what_runs(wheel_venv: Path, tmp_path: Path) -> None:
    where = subprocess.run([str(wheel_venv / "python"), "-c", "import attnflows_panel; print(attnflows_panel.__file__)"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(wheel_venv.parent) in where.stdout and str(REPO) not in where.stdout


@pytest.mark.slow
def test_the_installed_wheel_exports(wheel_venv: Path, tiny_dir: Path, tiny_classifier_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    command = [str(wheel_venv / "attnflows"), "export", "--pretrained", str(tiny_dir), "--finetuned", str(tiny_classifier_dir), "--text", "a good movie", "-o", str(out), "--quiet"]
    home = tmp_path / "home"
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "ATTNFLOWS_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 10_000 and "a good movie" in out.read_text()
    assert not (home / "page-templates").exists()  # the wheel ships the default page's template: none rendered, none saved


@pytest.mark.slow
def test_the_installed_wheel_serves_both_apps(wheel_venv: Path, tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen([str(wheel_venv / "attnflows"), "serve", "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        for name in ("compare", "single"):
            while True:
                try:
                    with urllib.request.urlopen(f"http://localhost:{port}/{name}", timeout=30) as page:
                        assert page.status == 200 and "attnflows" in page.read().decode()
                    break
                except OSError:
                    assert time.monotonic() < deadline and server.poll() is None
                    time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
