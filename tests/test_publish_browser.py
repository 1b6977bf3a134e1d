"""Publish stage: the Netron bundle renders the exported graph in headless Chromium, fully offline."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch

from _export_fixtures import exported
from stages import publish
from stages.core.config import parse_config
from stages.core.errors import ArtifactError
from stages.runner import run_stage
from stages.storage.stores import LocalStore

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.set_num_threads(1)
    done = exported(tmp_path_factory)  # reuses the export test's artifact when run in one session
    store = LocalStore(done.export_dir.parents[1])
    result = run_stage("publish", done.cfg, {"export": store.ref(store.find("export", done.export_dir.name))}, store)
    return Path(result.ref.uri), result.manifest.metrics


def test_bundle_layout_and_offline_patches(bundle):
    out, metrics = bundle
    assert metrics["graphs"] == 4 and metrics["netron_version"]
    for name in ("model.onnx", "model_kv.onnx", "model.pt2", "model.int8.onnx"):
        assert (out / "graphs" / name).is_file()
    assert not list((out / "netron").glob("*.py"))  # the web app only, not Netron's Python server
    index = (out / "netron" / "index.html").read_text()
    assert '<meta name="version" content="0.0.0">' in index  # Netron then sends no telemetry
    assert 'name="date"' not in index and "connect-src 'self'" in index
    assert '<script type="text/javascript" src="offline.js"></script>' in index
    landing = (out / "index.html").read_text()
    assert 'href="netron/index.html?url=../graphs/model.onnx"' in landing
    assert json.loads((out / "bundle.json").read_text())["graphs"][0]["file"] == "model.onnx"


def test_disabled_publish_writes_no_bundle(bundle, tmp_path):
    out, _ = bundle
    export_dir = Path(json.loads((out / "manifest.json").read_text())["inputs"]["export"]["uri"])
    store = LocalStore(export_dir.parents[1])
    cfg = parse_config({"artifacts": {"store": str(store.root)}, "publish": {"enabled": False}})
    result = run_stage("publish", cfg, {"export": store.ref(store.find("export", export_dir.name))}, store)
    assert result.manifest.metrics == {"enabled": False}
    assert sorted(result.manifest.files) == ["bundle.json"]


def test_unknown_netron_layout_is_refused():
    with pytest.raises(ArtifactError, match="not supported by the offline bundle"):
        publish.offline_index("<html><head></head></html>", "netron/index.html")


def test_serve_bundle_binds_loopback(bundle):
    out, _ = bundle
    server = publish.serve_bundle(out, 0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/netron/index.js") as response:
            assert response.headers["Content-Type"].startswith("text/javascript")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/graphs/model.onnx") as response:
            assert response.read() == (out / "graphs" / "model.onnx").read_bytes()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_netron_renders_model_onnx_offline(bundle, tmp_path):
    from playwright.sync_api import sync_playwright

    out, _ = bundle
    server = publish.serve_bundle(out, 0)
    origin = f"http://127.0.0.1:{server.server_address[1]}/"
    requests: list[str] = []
    failures: list[str] = []  # network-level failures other than a navigation cancelling a request
    missing: list[str] = []  # HTTP errors: a file the bundle should contain but does not
    errors: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.on("request", lambda request: requests.append(request.url))
            context.on("requestfailed", lambda request: failures.append(request.url))
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))

            page.goto(origin + "index.html", wait_until="networkidle")
            link = page.locator("a", has_text="model.onnx").first.get_attribute("href")
            assert link == "netron/index.html?url=../graphs/model.onnx"
            page.goto(origin + link)  # the viewer link itself: no clicking, no file dialog
            page.locator("g.node").nth(10).wait_for(timeout=90_000)
            page.locator("body.default").wait_for(timeout=90_000)  # layout finished, spinner gone
            # Netron replaces window.eval, which Playwright's evaluate() needs: read the DOM as HTML.
            labels = set(re.findall(r"<text[^>]*>([^<]+)</text>", page.content()))
            artifacts = REPO / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "netron_model_onnx.png"))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert {"MatMul", "Softmax", "Gather", "input_ids", "logits"} <= labels, sorted(labels)
    assert any(url.startswith(origin + "graphs/model.onnx") for url in requests)
    outside = [url for url in requests if not url.startswith(origin)]
    assert outside == [], f"requests left 127.0.0.1: {outside}"
    assert failures == [] and missing == [] and errors == []
    assert (REPO / "test-artifacts" / "netron_model_onnx.png").stat().st_size > 10_000
