"""In headless Chromium, the MLflow UI of the test server opens the experiment on its runs table and
shows the pipeline run, its child runs and a loss chart. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from stages import registry
from tests._processes import CHROMIUM_ARGS

from ._servers import ARTIFACTS, http_json

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = CHROMIUM_ARGS
STAGES = list(registry.ORDER)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        if os.environ.get("GPTPIPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"GPTPIPE_REQUIRE_BROWSER=1 but no chromium at {CHROMIUM} (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as play:
        context = play.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=ARGS, headless=True, viewport={"width": 1600, "height": 1000}
        )
        yield context
        context.close()


def child_run_id(services, parent_id: str, stage: str) -> tuple[str, str]:
    parent = http_json(f"{services.mlflow_url}/api/2.0/mlflow/runs/get?run_id={parent_id}")["run"]
    experiment = parent["info"]["experiment_id"]
    found = http_json(
        f"{services.mlflow_url}/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [experiment],
            "filter": f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`gptpipe.stage` = '{stage}'",
        },
    )["runs"]
    return experiment, found[0]["info"]["run_id"]


def test_mlflow_ui_shows_the_pipeline_run_its_children_and_a_loss_chart(services, server_pipeline, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    parent_id = server_pipeline["runs"][0]["parent_run_id"]
    experiment, pretrain_id = child_run_id(services, parent_id, "pretrain")
    page = browser.new_page()

    page.goto(f"{services.mlflow_url}/#/experiments/{experiment}/runs/{parent_id}")
    page.get_by_text("Child runs", exact=True).wait_for(timeout=60_000)
    page.get_by_text(parent_id).first.wait_for(timeout=30_000)
    body = page.inner_text("body")
    assert "micro" in body, "the run name (the recipe) should be on the run page"
    for stage in STAGES:
        assert page.get_by_role("link", name=stage, exact=True).count() >= 1, f"child run {stage} not linked"
    page.screenshot(path=str(ARTIFACTS / "mlflow_pipeline_run.png"), full_page=True)

    page.goto(f"{services.mlflow_url}/#/experiments/{experiment}/runs/{pretrain_id}/model-metrics")
    search = page.get_by_placeholder("Search metric charts")
    search.wait_for(timeout=60_000)
    search.fill("train_loss")
    title = page.get_by_text("train_loss", exact=True).first
    title.wait_for(timeout=60_000)
    # The chart itself: Plotly draws an SVG with at least one line trace for the curve.
    page.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for(timeout=60_000)
    assert page.locator(".js-plotly-plot").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "mlflow_loss_chart.png"), full_page=True)
    page.close()


def test_the_experiment_link_gptpipe_gives_opens_on_the_runs_table(services, server_pipeline, browser):
    """MLflow 3's UI opens a bare experiment URL on its GenAI overview (empty for gptpipe) unless
    the URL or the browser's saved choice says "machine learning", whatever the experiment's tags.
    So gptpipe's links name that mode: the experiment link (in the Prefect report artifact) lands
    on the runs table, listing the pipeline's run, in a browser with nothing saved; and the run
    link the report card prints opens that run."""
    import re

    from flows import mlflow_links

    ARTIFACTS.mkdir(exist_ok=True)
    first = server_pipeline["runs"][0]
    experiment, _ = child_run_id(services, first["parent_run_id"], "pretrain")
    found = http_json(f"{services.mlflow_url}/api/2.0/mlflow/experiments/get?experiment_id={experiment}")
    tags = {t["key"]: t["value"] for t in found["experiment"].get("tags", [])}
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # what the UI's own kind selector writes

    page = browser.new_page()
    page.goto("about:blank")
    page.goto(mlflow_links.experiment_url(services.mlflow_url, experiment))
    page.get_by_text("Run Name", exact=True).first.wait_for(timeout=60_000)
    page.get_by_role("link", name="micro", exact=True).first.wait_for(timeout=60_000)
    assert f"/experiments/{experiment}/runs" in page.url, page.url
    page.screenshot(path=str(ARTIFACTS / "mlflow_experiment_runs.png"), full_page=True)

    printed = re.search(r"open (http://\S+)", first["stdout"])
    assert printed, first["stdout"]
    assert printed.group(1) == mlflow_links.run_url(services.mlflow_url, experiment, first["parent_run_id"])
    page.goto(printed.group(1))
    page.get_by_text(first["parent_run_id"]).first.wait_for(timeout=60_000)
    page.close()
