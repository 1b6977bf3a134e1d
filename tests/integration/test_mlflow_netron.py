"""In headless Chromium, the MLflow UI of the test server shows the publish stage's one-file Netron
viewer: its artifact view renders the page in a sandboxed blob iframe, and the graph's nodes appear
inside it. The run is logged by the publish stage itself (real MLflow server, artifacts in moto S3)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from _export_fixtures import exported

from tests._processes import CHROMIUM_ARGS

from ._servers import ARTIFACTS

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = CHROMIUM_ARGS
N_LAYER = 4


@pytest.fixture(scope="module")
def published_run(services, tmp_path_factory):
    """Run stage 'publish' on a 4-layer export with an MLflow run of the test server as its tracker."""
    from stages.core.tracking import start_run
    from stages.executor import run_stage
    from stages.storage.stores import LocalStore

    saved = dict(os.environ)
    os.environ.update(services.client_env())  # the MLflow client uploads artifacts to the moto bucket
    try:
        torch.set_num_threads(1)
        done = exported(tmp_path_factory, n_layer=N_LAYER)
        store = LocalStore(done.export_dir.parents[1])
        tracker = start_run(services.mlflow_url, "netron-view", run_name="publish-netron")
        ref = store.ref(store.find("export", done.export_dir.name))
        run_stage("publish", done.cfg, {"export": ref}, store, tracker, force=True)
        tracker.finish(ok=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return tracker.experiment_id, tracker.run_id


def test_mlflow_ui_renders_the_one_file_viewer_inside_its_iframe(services, published_run):
    if not Path(CHROMIUM).is_file():
        if os.environ.get("GPTPIPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GPTPIPE_REQUIRE_BROWSER=1 but no chromium at {CHROMIUM} (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    experiment, run_id = published_run
    ARTIFACTS.mkdir(exist_ok=True)
    requests: list[str] = []
    with sync_playwright() as play:
        browser = play.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{services.mlflow_url}/#/experiments/{experiment}/runs/{run_id}/artifacts")
        for folder in ("netron", "standalone", "architecture.onnx.html"):  # the artifact tree, as a user clicks it
            page.get_by_text(folder, exact=True).first.click(timeout=60_000)
        iframe = page.locator("iframe").first
        iframe.wait_for(timeout=60_000)
        sandbox, src = iframe.get_attribute("sandbox"), iframe.get_attribute("src") or ""
        frame = page.frame_locator("iframe").first
        frame.locator("g.node").nth(5).wait_for(timeout=120_000)
        labels = re.findall(r"<text[^>]*>([^<]+)</text>", frame.locator("svg#canvas").inner_html())
        page.screenshot(path=str(ARTIFACTS / "mlflow_netron_viewer.png"), full_page=True)
        browser.close()
    assert src.startswith("blob:") and "allow-same-origin" not in (sandbox or ""), (src, sandbox)
    assert labels.count("Block") == N_LAYER, labels
    assert {"Embedding", "RMSNorm", "Linear"} <= set(labels)
    outside = [url for url in requests if not url.startswith((services.mlflow_url, "data:", "blob:", "about:"))]
    assert outside == [], f"requests beyond the MLflow server and the page: {outside[:5]}"
