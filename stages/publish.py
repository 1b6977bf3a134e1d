"""Stage ``publish``: a self-contained Netron viewer bundle of the exported graphs.

Bundle layout (open ``index.html`` through any static HTTP server)::

    index.html          landing page: one link per graph, opening it in the bundled Netron
    netron/             Netron's static web app, copied from the installed ``netron`` package
    graphs/             architecture.onnx, model.onnx, model_kv.onnx, model.pt2, model.gguf, ... (+ .onnx.data side files)
    standalone/         <graph>.html per ONNX graph: one self-contained file each (Netron + the graph's
                        structure without weight values), the copy logged to MLflow (stages.viewer.netron_page)
    bundle.json         what is in the bundle (graph files, sizes, Netron version)

Netron's web app opens the model named by its ``?url=`` query parameter, so each link is
``netron/index.html?url=../graphs/<file>``: relative, so the bundle works wherever it is served.
The copied app is made strictly offline: Netron asks ipinfo.io whether to show a cookie
banner unless a ``consent`` cookie exists (``offline.js`` sets it), reports usage to Google
Analytics when its version meta is a release number (set to ``0.0.0``, which Netron treats
as an unpackaged build), and nags for an update after 180 days (its build-date meta is
removed). A ``connect-src 'self'`` CSP then blocks any request we did not foresee.

``python -m stages.viewer.serve serve DIR --port N`` serves a bundle on 127.0.0.1.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

from stages.core.errors import ArtifactError
from stages.core.stage import Output, Sections, Stage
from stages.core.tracking import Tracker
from stages.formats.layout import ARCHITECTURE_GRAPH, META_FILE
from stages.formats.registry import FORMATS, descriptions
from stages.viewer import netron_page
from stages.viewer.serve import LANDING

NETRON_DIR = "netron"
GRAPHS_DIR = "graphs"
BUNDLE_FILE = "bundle.json"
OFFLINE_SCRIPT = "offline.js"

STANDALONE_DIR = "standalone"


def _shown_by_default() -> dict[str, str]:
    """The export files a bundle shows by default, with their formats' one description: the architecture
    view first (the picture a reader opens first), then every other viewable file in registry order."""
    described = descriptions()
    shown = {name: described[name] for fmt in FORMATS for name in fmt.viewer}
    return {ARCHITECTURE_GRAPH: shown.pop(ARCHITECTURE_GRAPH), **shown}


DESCRIPTIONS = _shown_by_default()

# Sets Netron's own consent cookie, so it never asks ipinfo.io where the viewer is.
_OFFLINE_JS = """// Added by gptpipe: keep the bundled Netron from contacting any other host.
document.cookie = 'consent=' + Date.now() + '; path=/; max-age=' + (30 * 24 * 3600) + '; SameSite=Strict';
"""


def netron_package() -> tuple[Path, str]:
    """Directory of the installed Netron web app and its version."""
    try:
        import netron
    except ImportError:
        raise ArtifactError(
            "the 'netron' package is not installed; pip install netron (it ships the web viewer)"
        ) from None
    root = Path(netron.__file__).resolve().parent
    if not (root / netron_page.NETRON_INDEX).is_file():
        raise ArtifactError(
            f"{root}: installed netron has no index.html; reinstall netron (pip install --force-reinstall netron)"
        )
    return root, getattr(netron, "__version__", "unknown")


def offline_index(text: str, source: str) -> str:
    """Netron's index.html with telemetry, the consent lookup and the update nag switched off."""
    edits = [
        (r'<meta name="version" content="[^"]*">', '<meta name="version" content="0.0.0">'),
        (r'<meta name="date" content="[^"]*">\n?', ""),
        (
            r"(<meta http-equiv=\"Content-Security-Policy\" content=\"[^\"]*?)(\">)",
            r"\1; connect-src 'self' data: blob:\2",
        ),
        (
            r'(<script type="text/javascript" src="index.js"></script>)',
            f'<script type="text/javascript" src="{OFFLINE_SCRIPT}"></script>\n\\1',
        ),
    ]
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text, count=1)
        if count != 1:
            raise ArtifactError(
                f"{source}: Netron's index.html no longer contains {pattern!r}; this netron version is not "
                "supported by the offline bundle — pin netron to 9.x or update stages/publish.py"
            )
    return text


def copy_netron(dest: Path) -> str:
    """Copy the web app (not its Python server) into ``dest``, made offline; return its version."""
    root, version = netron_package()
    ignore = shutil.ignore_patterns("*.py", "__pycache__", "*.pyc")
    shutil.copytree(root, dest, ignore=ignore)
    index = dest / netron_page.NETRON_INDEX
    index.write_text(offline_index(index.read_text(encoding="utf-8"), str(root / index.name)), encoding="utf-8")
    (dest / OFFLINE_SCRIPT).write_text(_OFFLINE_JS, encoding="utf-8")
    return version


def collect_graphs(export_dir: Path, names: list[str], dest: Path) -> list[dict]:
    """Copy the wanted graphs (and their external-data files) into ``dest``."""
    dest.mkdir()
    graphs = []
    for name in names:
        path = export_dir / name
        if not path.is_file():
            continue
        shutil.copy2(path, dest / name)
        extra = sorted(p for p in export_dir.glob(f"{name}.data") if p.is_file())
        for side in extra:
            shutil.copy2(side, dest / side.name)
        size = path.stat().st_size + sum(p.stat().st_size for p in extra)
        graphs.append(
            {"file": name, "bytes": size, "description": DESCRIPTIONS.get(name, ""), "link": viewer_link(name)}
        )
    if not graphs:
        raise ArtifactError(f"{export_dir}: none of publish.graphs {names} exist in the export; rerun stage 'export'")
    return graphs


def viewer_link(name: str) -> str:
    return f"{NETRON_DIR}/{netron_page.NETRON_INDEX}?url=../{GRAPHS_DIR}/{name}"


def _standalone_link(graph: dict) -> str:
    page = graph.get("standalone")
    return f'<a href="{html.escape(page)}">one-file viewer</a>' if page else ""


def write_standalone(graphs: list[dict], graphs_dir: Path, dest: Path, title: str) -> None:
    """One self-contained viewer page per ONNX graph (``graph["standalone"]`` = its path in the bundle)."""
    root, _ = netron_package()
    dest.mkdir()
    for graph in graphs:
        if graph["file"].endswith(".onnx"):  # a .pt2 zip cannot be shown without its weights
            page = netron_page.write_page(
                graphs_dir / graph["file"],
                dest / f"{graph['file']}{netron_page.SUFFIX}",
                root,
                f"{title}: {graph['file']}",
            )
            graph["standalone"] = f"{STANDALONE_DIR}/{page.name}"
            graph["standalone_bytes"] = page.stat().st_size


def landing_page(title: str, graphs: list[dict], meta: dict) -> str:
    """A plain HTML page (no scripts, no external assets) listing each graph with its viewer link."""
    rows = "\n".join(
        f'<tr><td><a href="{html.escape(g["link"])}">{html.escape(g["file"])}</a></td>'
        f"<td>{g['bytes'] / 1e6:.2f} MB</td><td>{html.escape(g['description'])}</td>"
        f'<td><a href="{GRAPHS_DIR}/{html.escape(g["file"])}" download>download</a></td>'
        f"<td>{_standalone_link(g)}</td></tr>"
        for g in graphs
    )
    shape = meta.get("model", {})
    facts = ", ".join(
        f"{k} {shape[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k in shape
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} graphs</title>
<link rel="icon" type="image/png" href="{NETRON_DIR}/icon.png">
<style>body{{font-family:sans-serif;margin:2em;color:#222}}td,th{{padding:.3em 1em;text-align:left}}
tr:nth-child(even){{background:#f3f3f3}}small{{color:#666}}</style></head>
<body><h1>{html.escape(title)}: exported graphs</h1>
<p><small>{html.escape(facts)}; ONNX opset {html.escape(str(meta.get("opset", "?")))}.
Each link opens the graph in the Netron viewer bundled beside this page (no network needed).</small></p>
<table><tr><th>graph</th><th>size</th><th>what it computes</th><th></th><th></th></tr>
{rows}
</table></body></html>
"""


def run(cfg: Sections, inputs: dict[str, Path], out: Path, tracker: Tracker) -> dict:
    export_dir = inputs["export"]
    if not cfg.publish.enabled:
        (out / BUNDLE_FILE).write_text(json.dumps({"enabled": False}) + "\n", encoding="utf-8")
        return {"enabled": False}
    meta_path = export_dir / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    graphs = collect_graphs(export_dir, cfg.publish.graphs or list(DESCRIPTIONS), out / GRAPHS_DIR)
    version = copy_netron(out / NETRON_DIR)
    write_standalone(graphs, out / GRAPHS_DIR, out / STANDALONE_DIR, cfg.name)
    (out / LANDING).write_text(landing_page(cfg.name, graphs, meta), encoding="utf-8")
    bundle = {"enabled": True, "netron_version": version, "graphs": graphs, "landing": LANDING}
    (out / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2) + "\n", encoding="utf-8")
    # MLflow gets the landing page and the graphs; the 30 MB viewer stays in the artifact store.
    tracker.log_artifact(out / LANDING, "netron")
    tracker.log_artifact(out / GRAPHS_DIR, "netron/graphs")
    tracker.log_artifact(out / STANDALONE_DIR, "netron/standalone")  # these open inside the MLflow UI
    return {
        "enabled": True,
        "graphs": len(graphs),
        "graph_bytes": sum(g["bytes"] for g in graphs),
        "netron_version": version,
        "links": {g["file"]: g["link"] for g in graphs},
        "standalone": {g["file"]: g["standalone"] for g in graphs if "standalone" in g},
    }


STAGE = Stage(
    name="publish",
    summary="Netron viewer bundle and graphs",
    sections=("publish", "name"),  # the recipe's name titles the pages, so it is part of the key
    inputs=("export",),
    outputs=(
        Output(LANDING, "landing page: one link per graph, opening it in the bundled Netron"),
        Output(NETRON_DIR, "Netron's static web app, made strictly offline"),
        Output(GRAPHS_DIR, "the exported graphs"),
        Output(STANDALONE_DIR, "one self-contained page per ONNX graph (the copy logged to MLflow)"),
        Output(BUNDLE_FILE, "what is in the bundle: graph files, sizes, Netron version"),
    ),
    run=run,
    headline=("enabled",),
    headline_when_set=("graphs", "netron_version"),  # publish.enabled
)
