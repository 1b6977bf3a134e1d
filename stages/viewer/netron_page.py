"""One self-contained HTML file per graph: Netron's web app and the graph's structure, inlined.

Why: MLflow's artifact view shows an ``.html`` artifact in an iframe whose ``src`` is a blob URL
with ``sandbox="allow-scripts"``. That page has an opaque origin and no siblings, so Netron's
usual loading — relative ``import()`` of its ES modules, an XHR for the model and the operator
metadata, settings in ``localStorage``, a consent cookie — fails there. This page needs none of it:

* every ES module Netron needs for ONNX is a ``data:`` URL named by an import map under a bare
  specifier (``netron/view.js``); the modules' own ``'./x.js'`` imports are rewritten to those
  names, so nothing resolves against the page's (opaque) URL;
* a small boot module builds Netron's browser host with the model, ``onnx-metadata.json``,
  settings and cookies served from memory, and opens the model with no click;
* the graph is inlined without its weight values (every initializer keeps name, type and shape),
  so the page stays a few MB whatever the model's size;
* a Content-Security-Policy with ``default-src 'none'`` blocks any request beyond the page itself.

The same file works opened from disk, from any static server and inside MLflow's iframe.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from stages.core.errors import ArtifactError

# onnx loads in the functions that read a graph: the publish stage reads this module's names when it
# is declared, and validating a recipe must not load onnx.
if TYPE_CHECKING:
    import onnx

# Netron's modules that opening an ONNX protobuf can reach (view.js imports the rest lazily).
MODULES = (
    "base",
    "text",
    "json",
    "xml",
    "protobuf",
    "flatbuffers",
    "flexbuffers",
    "zip",
    "tar",
    "grapher",
    "dagre",
    "browser",
    "view",
    "onnx",
    "onnx-proto",
    "onnx-schema",
    "message",
)
ASSETS = ("onnx-metadata.json",)
SUFFIX = ".html"  # model.onnx -> model.onnx.html
NETRON_INDEX = "index.html"  # the Netron web app's own page (not a bundle's landing page)
LARGE_CONSTANT = 64  # elements: Constant nodes above this are weights folded by the exporter

_CSP = (
    "default-src 'none'; script-src 'unsafe-inline' data:; style-src 'unsafe-inline'; img-src data:; "
    "font-src data:; connect-src data:; frame-src 'none'"
)

# Runs before any module: settings in memory (localStorage throws in an opaque origin) and
# errors shown on the page instead of lost.
_PRELUDE = """
window.exports = {};  // Netron's modules publish their internals here (browser.Context is not exported)
window.__gptpipe_errors__ = [];
window.addEventListener('error', (e) => window.__gptpipe_errors__.push(String(e.message || e)));
window.addEventListener('unhandledrejection', (e) => window.__gptpipe_errors__.push(String(e.reason)));
"""

_BOOT = """
import * as base from 'netron/base.js';
import * as browser from 'netron/browser.js';
import * as view from 'netron/view.js';
const page = JSON.parse(document.getElementById('gptpipe-page').textContent);
const settings = new Map();
const host = new browser.Host();
host._environment.serial = true;  // layout in this thread: a Worker needs a URL to load from
host.require = (id) => import(`netron/${id.replace(/^\\.\\//, '')}.js`);
host.worker = () => { throw new Error('no workers in a self-contained page'); };
host.asset = async (file) => {
    if (!(file in page.assets)) { throw new Error(`asset '${file}' is not inlined`); }
    return page.assets[file];
};
host.fetch = async (file) => { throw new Error(`'${file}' is not part of this self-contained page`); };
host._request = async (url) => { throw new Error(`no requests from this page (${url})`); };
host._getCookie = (name) => (name === 'consent' ? 'inlined' : '');
host._setCookie = () => {};
host.get = (name) => settings.get(name);
host.set = (name, value) => settings.set(name, value);
host.delete = (name) => settings.delete(name);
host.openURL = () => {};
host.start = async () => {
    const bytes = Uint8Array.from(atob(document.getElementById('gptpipe-graph').textContent.trim()), (c) => c.charCodeAt(0));
    const context = new window.exports.browser.Context(host, '', page.file, page.file, new base.BinaryStream(bytes));
    const status = await host._openContext(context);
    document.body.setAttribute('data-gptpipe-status', status || 'open');
};
window.__view__ = new view.View(host);
window.__view__.start();
"""


def strip_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every initializer's (and large constant's) values removed; names, types and shapes kept."""
    import onnx

    def clear(tensor: onnx.TensorProto) -> None:
        for field in (
            "raw_data",
            "float_data",
            "int32_data",
            "int64_data",
            "double_data",
            "uint64_data",
            "string_data",
            "external_data",
        ):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.DEFAULT

    graphs = [proto.graph]
    while graphs:  # subgraphs (If/Loop bodies) hold initializers too
        graph = graphs.pop()
        for tensor in graph.initializer:
            clear(tensor)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                    count = 1
                    for dim in attribute.t.dims:
                        count *= dim
                    if count > LARGE_CONSTANT:
                        clear(attribute.t)
                graphs += [attribute.g, *attribute.graphs]
    return proto


def op_types(proto: onnx.ModelProto) -> set[str]:
    """Every operator type the graph uses, in its main graph, its subgraphs and its functions."""
    import onnx

    found: set[str] = set()
    graphs = [proto.graph]
    for function in proto.functions:
        found |= {node.op_type for node in function.node}
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            found.add(node.op_type)
            for attribute in node.attribute:
                graphs += (
                    [attribute.g, *attribute.graphs]
                    if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                    else []
                )
    return found


def operator_metadata(text: str, used: set[str]) -> str:
    """Netron's onnx-metadata.json (5.6 MB: every operator, with examples) cut to the operators used."""
    entries = [
        {k: v for k, v in entry.items() if k != "examples"} for entry in json.loads(text) if entry.get("name") in used
    ]
    return json.dumps(entries, separators=(",", ":"))


def _module_url(source: str) -> str:
    """A module as a data: URL, its relative imports renamed to the import map's bare names."""
    source = re.sub(r"""(from\s+|import\s*\(\s*)(['"])\./([\w-]+)\.js\2""", r"\1\2netron/\3.js\2", source)
    return "data:text/javascript;base64," + base64.b64encode(source.encode("utf-8")).decode("ascii")


def _body(index_html: str, source: str) -> str:
    match = re.search(r"<body[^>]*>(.*)</body>", index_html, re.S)
    if match is None or 'id="logo-github"' not in match.group(1):
        raise ArtifactError(
            f"{source}: Netron's index.html has no <body> with the elements its host needs; "
            "this netron version is not supported — pin netron to 9.x or update stages/viewer/netron_page.py"
        )
    return match.group(1)


def _head_styles(index_html: str) -> str:
    return "\n".join(re.findall(r"<style>.*?</style>", index_html, re.S))


def render_page(netron_root: Path, graph: onnx.ModelProto, file_name: str, title: str) -> str:
    """The HTML text of the self-contained viewer for ``graph`` (already stripped of weights)."""
    index_path = netron_root / NETRON_INDEX
    index_html = index_path.read_text(encoding="utf-8")
    missing = [m for m in MODULES if not (netron_root / f"{m}.js").is_file()]
    missing += [a for a in ASSETS if not (netron_root / a).is_file()]
    if missing:
        raise ArtifactError(
            f"{netron_root}: netron lacks {', '.join(missing)}; this netron version is not supported "
            "by the self-contained viewer — pin netron to 9.x or update stages/viewer/netron_page.py"
        )
    imports = {f"netron/{m}.js": _module_url((netron_root / f"{m}.js").read_text(encoding="utf-8")) for m in MODULES}
    used = op_types(graph)
    assets = {
        "onnx-metadata.json": operator_metadata((netron_root / "onnx-metadata.json").read_text(encoding="utf-8"), used)
    }
    page = {"file": file_name, "assets": assets}
    encoded = base64.b64encode(graph.SerializeToString()).decode("ascii")
    css = (netron_root / "grapher.css").read_text(encoding="utf-8")
    # JSON inside <script>: "</" must not end the element early.
    page_json = json.dumps(page).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="version" content="0.0.0">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{html.escape(title)}</title>
<style>{css}</style>
{_head_styles(index_html)}
<script>{_PRELUDE}</script>
<script type="importmap">{json.dumps({"imports": imports})}</script>
<script type="application/json" id="gptpipe-page">{page_json}</script>
<script type="application/octet-stream" id="gptpipe-graph">{encoded}</script>
<script type="module">{_BOOT}</script>
</head>
<body class="welcome spinner">
{_body(index_html, str(index_path))}
</body>
</html>
"""


def write_page(graph_path: Path, dest: Path, netron_root: Path, title: str) -> Path:
    """Write the self-contained viewer of the ONNX graph at ``graph_path`` (external weights never read)."""
    import onnx

    try:
        proto = onnx.load(str(graph_path), load_external_data=False)
    except Exception as exc:
        raise ArtifactError(f"{graph_path}: not a readable ONNX graph ({exc}); rerun stage 'export'") from None
    dest.write_text(render_page(netron_root, strip_weights(proto), graph_path.name, title), encoding="utf-8")
    return dest
