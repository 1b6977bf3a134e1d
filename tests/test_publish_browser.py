"""Publish stage: the Netron bundle renders the exported graph in headless Chromium, fully offline."""

from __future__ import annotations

import base64
import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
import torch
from _export_fixtures import MICRO, exported

from stages import publish
from stages.core.config import parse_config
from stages.core.errors import ArtifactError
from stages.executor import run_stage
from stages.storage.stores import LocalStore
from stages.viewer.serve import serve_bundle
from tests._processes import CHROMIUM_ARGS

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.set_num_threads(1)
    done = exported(tmp_path_factory)  # reuses the export test's artifact when run in one session
    store = LocalStore(done.export_dir.parents[1])
    result = run_stage("publish", done.cfg, {"export": store.ref(store.find("export", done.export_dir.name))}, store)
    return Path(result.ref.uri), result.manifest.metrics


@pytest.mark.slow  # the micro export
def test_bundle_layout_and_offline_patches(bundle):
    out, metrics = bundle
    assert metrics["graphs"] == 6 and metrics["netron_version"]
    for name in ("architecture.onnx", "model.onnx", "model_kv.onnx", "model.pt2", "model.int8.onnx", "model.gguf"):
        assert (out / "graphs" / name).is_file()
    for name in ("architecture.onnx", "model.onnx", "model_kv.onnx", "model.int8.onnx"):  # ONNX graphs only
        assert (
            metrics["standalone"][name] == f"standalone/{name}.html" and (out / "standalone" / f"{name}.html").is_file()
        )
    assert "model.pt2" not in metrics["standalone"] and "model.gguf" not in metrics["standalone"]
    assert not list((out / "netron").glob("*.py"))  # the web app only, not Netron's Python server
    index = (out / "netron" / "index.html").read_text()
    assert '<meta name="version" content="0.0.0">' in index  # Netron then sends no telemetry
    assert 'name="date"' not in index and "connect-src 'self'" in index
    assert '<script type="text/javascript" src="offline.js"></script>' in index
    landing = (out / "index.html").read_text()
    assert 'href="netron/index.html?url=../graphs/model.onnx"' in landing
    assert 'href="standalone/model.onnx.html"' in landing
    assert 'href="netron/index.html?url=../graphs/model.gguf"' in landing and 'href="graphs/model.gguf"' in landing
    assert json.loads((out / "bundle.json").read_text())["graphs"][0]["file"] == "architecture.onnx"


@pytest.mark.slow  # the micro export
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


@pytest.mark.slow  # the micro export
def test_serve_bundle_binds_loopback(bundle):
    out, _ = bundle
    server = serve_bundle(out, 0)
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
    server = serve_bundle(out, 0)
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


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_netron_renders_model_gguf_offline(bundle):
    """The bundled Netron draws the GGUF as llama.cpp sees it: tokenizer, then one block of ops per layer."""
    from playwright.sync_api import sync_playwright

    out, _ = bundle
    server = serve_bundle(out, 0)
    origin = f"http://127.0.0.1:{server.server_address[1]}/"
    requests: list[str] = []
    errors: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(origin + "index.html", wait_until="networkidle")
            link = page.locator("a", has_text="model.gguf").first.get_attribute("href")
            assert link == "netron/index.html?url=../graphs/model.gguf"
            page.goto(origin + link)  # the landing page's viewer link: no clicking, no file dialog
            page.locator("g.node").nth(5).wait_for(timeout=90_000)
            page.locator("body.default").wait_for(timeout=90_000)  # layout finished, spinner gone
            labels = _labels(page)
            artifacts = REPO / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "netron_model_gguf.png"))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert labels[0] == "tokenizer", labels
    assert {"EMBEDDING", "RMS_NORM", "MULTI_HEAD_ATTENTION", "ADD", "MUL_MAT"} <= set(labels), labels
    assert labels.count("MULTI_HEAD_ATTENTION") == MICRO["n_layer"], labels
    assert any(url.startswith(origin + "graphs/model.gguf") for url in requests)
    outside = [url for url in requests if not url.startswith(origin)]
    assert outside == [] and errors == [], (outside, errors)


# ---------------------------------------------------------------------------- architecture view, 4 layers

N_LAYER = 4


@pytest.fixture(scope="module")
def deep_bundle(tmp_path_factory):
    torch.set_num_threads(1)
    done = exported(tmp_path_factory, n_layer=N_LAYER)
    store = LocalStore(done.export_dir.parents[1])
    result = run_stage("publish", done.cfg, {"export": store.ref(store.find("export", done.export_dir.name))}, store)
    return Path(result.ref.uri)


def _labels(page) -> list[str]:
    # Netron replaces window.eval, which Playwright's evaluate() needs: read the DOM as HTML.
    return re.findall(r"<text[^>]*>([^<]+)</text>", page.content())


def _open_function(page, op: str) -> None:
    """Click the 'show function definition' button (ƒ) of the first node of type ``op``."""
    node = page.locator("g.node", has=page.locator("text", has_text=re.compile(f"^{op}$"))).first
    node.locator("text", has_text="\u0192").first.click()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_architecture_view_shows_blocks_that_open_into_attention_and_mlp(deep_bundle):
    from playwright.sync_api import sync_playwright

    server = serve_bundle(deep_bundle, 0)
    origin = f"http://127.0.0.1:{server.server_address[1]}/"
    requests: list[str] = []
    errors: list[str] = []
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 1400})
            context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(origin + "netron/index.html?url=../graphs/architecture.onnx")  # no click
            page.locator("g.node").nth(5).wait_for(timeout=90_000)
            page.locator("body.default").wait_for(timeout=90_000)
            top_nodes = page.locator("g.node").count()
            top = _labels(page)
            page.screenshot(path=str(artifacts / "netron_architecture.png"))
            _open_function(page, "Block")
            page.locator("g.node", has=page.locator("text", has_text=re.compile("^Attention$"))).first.wait_for(
                timeout=60_000
            )
            block = _labels(page)
            page.screenshot(path=str(artifacts / "netron_architecture_block.png"))
            _open_function(page, "Attention")
            page.locator(
                "g.node", has=page.locator("text", has_text=re.compile("^DotProductAttention$"))
            ).first.wait_for(timeout=60_000)
            attention = _labels(page)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert top_nodes <= 15, f"{top_nodes} nodes at the top level: {top}"
    assert top.count("Block") == N_LAYER, top
    assert {"Embedding", "RotaryTables", "RMSNorm", "Linear", "input_ids", "logits"} <= set(top)
    assert {"RMSNorm", "Attention", "SwiGLU", "Add"} <= set(block) and "Block" not in block, block
    assert {"Linear", "RoPE", "DotProductAttention", "SplitHeads", "MergeHeads"} <= set(attention), attention
    outside = [url for url in requests if not url.startswith(origin)]
    assert outside == [] and errors == [], (outside, errors)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_one_file_viewer_renders_in_a_sandboxed_blob_iframe(deep_bundle):
    """The way MLflow's artifact view shows an .html artifact: blob URL, sandbox="allow-scripts"."""
    from playwright.sync_api import sync_playwright

    html_bytes = (deep_bundle / "standalone" / "architecture.onnx.html").read_bytes()
    assert len(html_bytes) < 5_000_000  # a few MB: structure and the ONNX parts of Netron only
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.on("request", lambda request: requests.append(request.url))
        page = context.new_page()
        page.set_content(
            '<html><body><iframe id="viewer" sandbox="allow-scripts" '
            'style="width:1200px;height:950px"></iframe></body></html>'
        )
        # The page's bytes as a blob: URL in a sandboxed iframe, as MLflow's artifact view does it.
        page.evaluate(
            "(b64) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)); "
            "document.getElementById('viewer').src = URL.createObjectURL(new Blob([bytes], {type: 'text/html'})); }",
            base64.b64encode(html_bytes).decode("ascii"),
        )
        frame = page.frame_locator("#viewer")
        frame.locator("g.node").nth(5).wait_for(timeout=90_000)
        labels = re.findall(r"<text[^>]*>([^<]+)</text>", frame.locator("svg#canvas").inner_html())
        page.screenshot(path=str(REPO / "test-artifacts" / "netron_standalone_blob_iframe.png"))
        browser.close()
    assert labels.count("Block") == N_LAYER, labels
    outside = [url for url in requests if not url.startswith(("data:", "blob:", "about:"))]
    assert outside == [], f"the one-file viewer made requests: {outside[:5]}"
