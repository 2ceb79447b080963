"""``attnflows serve`` listens on loopback only unless asked, and a model folder's own code never runs unasked."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from attnflows_panel.errors import ModelError
from attnflows_panel.models import load_encoder
from attnflows_panel.serve import host_checked, is_loopback, release_memory, served_host, websocket_origins

CUSTOM_CODE = """
from pathlib import Path
from transformers import BertConfig, BertModel

Path(MARKER).write_text("remote code ran")


class CustomConfig(BertConfig):
    model_type = "custom-bert"


class CustomModel(BertModel):
    config_class = CustomConfig
"""


@pytest.fixture
def remote_code_dir(tiny_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny BERT whose config points at Python code in the folder (it writes RAN when imported)."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_dir, folder)
    (folder / "configuration_custom.py").write_text(CUSTOM_CODE.replace("MARKER", repr(str(folder / "RAN"))))  # transformers runs a copy elsewhere
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "custom-bert"  # a type only the folder's code defines
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "configuration_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_folder_code_is_refused_even_when_stdin_says_yes(remote_code_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("a sentence\n")
    cli = [sys.executable, "-m", "attnflows_panel.cli", "extract", str(corpus), "--model", str(remote_code_dir), "-o", str(tmp_path / "run"), "--quiet"]
    done = subprocess.run(cli, input="y\ny\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("attnflows: error: cannot load model") and done.stderr.count("\n") == 1
    assert not (remote_code_dir / "RAN").exists()
    assert not (tmp_path / "run").exists()


def test_the_api_runs_a_model_folder_code_only_when_asked(remote_code_dir: Path) -> None:
    with pytest.raises(ModelError, match="cannot load model"):
        load_encoder(remote_code_dir)
    assert not (remote_code_dir / "RAN").exists()
    load_encoder(remote_code_dir, trust_remote_code=True)
    assert (remote_code_dir / "RAN").exists()


def test_origins_are_the_loopback_names_or_the_address_asked_for() -> None:
    assert websocket_origins("127.0.0.1", 5006) == ["localhost:5006", "127.0.0.1:5006"]
    assert websocket_origins("10.1.2.3", 80, ["lab.example:8080", "lab"]) == ["10.1.2.3:80", "lab.example:8080", "lab:80"]
    assert is_loopback("::1") and is_loopback("127.0.0.2") and not is_loopback("0.0.0.0") and not is_loopback("lab.example")


def other_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (none on a machine without a network)."""
    names = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in names if ":" not in a and not is_loopback(a)]


def test_serve_answers_on_loopback_and_nowhere_else() -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "attnflows_panel.cli", "serve", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "this machine only" in server.stdout.readline()
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/single", timeout=30) as page:
                    assert page.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.5)
        for address in other_addresses():
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
                pass
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_serve_refuses_a_bad_port(port: str) -> None:
    done = subprocess.run([sys.executable, "-m", "attnflows_panel.cli", "serve", "--port", port], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "expected a port from 1 to 65535" in done.stderr


def test_only_the_served_host_names_are_answered() -> None:
    origins = websocket_origins("127.0.0.1", 5006)
    assert served_host("localhost:5006", origins) and served_host("127.0.0.1:5006", origins)
    assert not served_host("evil.example:5006", origins) and not served_host("localhost:5007", origins) and not served_host("", origins)
    assert served_host("lab", websocket_origins("10.1.2.3", 80, ["lab"]))


@pytest.mark.parametrize("host, built", [("evil.example:5006", False), ("localhost:5006", True), ("", False)])
def test_a_page_is_built_only_for_a_served_host(monkeypatch: pytest.MonkeyPatch, host: str, built: bool) -> None:
    """A DNS-rebound request (any other Host) costs a one-line refusal, never a view."""
    import panel as pn

    monkeypatch.setattr(type(pn.state), "headers", property(lambda _: {"Host": host}))
    released: list[object] = []
    monkeypatch.setattr(pn.state, "on_session_destroyed", released.append)
    calls: list[int] = []
    page = host_checked(lambda: calls.append(1) or pn.pane.Markdown("the app"), websocket_origins("127.0.0.1", 5006))()
    assert calls == ([1] if built else [])
    assert len(released) == (1 if built else 0)  # a served session gives its memory back when it is discarded
    assert built or page.object.startswith(f"attnflows does not serve the address {host}: open it as localhost:5006")


def test_memory_is_handed_back_to_the_system_on_glibc() -> None:
    import platform

    assert release_memory() is (platform.libc_ver()[0] == "glibc")
