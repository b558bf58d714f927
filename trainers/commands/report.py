"""`kiln report RUN_DIR --out report.html`: one self-contained HTML file (every image inlined as a
data: URI, no script or style from elsewhere) that a person can open offline or attach to a note.

    - the run: family, last step
    - the latest sample grid of each kind, then the training and evaluation curves (train/...,
      val/..., eval/...): what a person opens the report for, on the first screen
    - the other curves (data/..., dist/..., ...) that change over the run
    - one table of the series that never change or were logged once (data/skipped at 0, the
      world size): a flat plot each would push everything else below the fold
    - every sample grid in order of step, so the same grid can be followed over training
    - the config
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import defaultdict

import fsspec
import yaml

from kiln.trainers.commands.args import CommandParser


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with fsspec.open(f"{run_dir}/metrics.jsonl", "r") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            step = row.pop("step", None)
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and step is not None:
                    series[key].append((int(step), float(value)))
    return dict(series)


def plot(name: str, points: list[tuple[int, float]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*sorted(points))
    fig, ax = plt.subplots(figsize=(4.2, 2.6), dpi=100)
    ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.2)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


_STEP = re.compile(r"^(?P<name>.*?)[-_]?step[-_]?(?P<step>\d+)$")


def sample_grids(run_dir: str) -> dict[str, list[tuple[int, bytes]]]:
    """samples/<name>-step<N>.png (or any .png) -> {name: [(step, png bytes), ...]} by step."""
    fs, root = fsspec.core.url_to_fs(f"{run_dir}/samples")
    grids: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
    if not fs.exists(root):
        return {}
    for path in sorted(fs.find(root)):
        if not path.endswith(".png"):
            continue
        stem = path[len(root):].strip("/")[:-4]
        match = _STEP.match(stem)
        name, step = (match["name"] or "samples", int(match["step"])) if match else (stem, -1)
        grids[name].append((step, fs.cat_file(path)))
    return {name: sorted(items) for name, items in sorted(grids.items())}


# Metric prefixes that tell whether training works: shown first.
LEADING = ("train", "val", "eval")


def _flat(points: list[tuple[int, float]]) -> bool:
    """Logged once, or the same value every time: a table row, not a plot."""
    return len(points) < 2 or len({v for _, v in points}) == 1


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(run_dir: str) -> str:
    run_dir = run_dir.rstrip("/")
    fs, root = fsspec.core.url_to_fs(run_dir)
    if not fs.exists(f"{root}/metrics.jsonl") and not fs.exists(f"{root}/config.yaml"):
        raise FileNotFoundError(f"{run_dir} is not a kiln run directory (no metrics.jsonl or config.yaml)")
    config = fs.cat_file(f"{root}/config.yaml").decode() if fs.exists(f"{root}/config.yaml") else ""
    family = ""
    if config:
        model = (yaml.safe_load(config) or {}).get("model") or {}
        family = model.get("class_path", "") if isinstance(model, dict) else ""
    metrics = read_metrics(run_dir) if fs.exists(f"{root}/metrics.jsonl") else {}
    last = max((s for points in metrics.values() for s, _ in points), default=0)
    grids = sample_grids(run_dir)
    flat = {name: points for name, points in metrics.items() if _flat(points)}
    curves = {name: points for name, points in sorted(metrics.items()) if name not in flat}
    leading = {name: points for name, points in curves.items() if name.split("/", 1)[0] in LEADING}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>kiln report: {html.escape(run_dir)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;color:#222}h2{margin-top:1.5em}"
        ".row{display:flex;flex-wrap:wrap;gap:10px}.cell{text-align:center;font-size:12px}"
        "img{max-width:100%;image-rendering:pixelated}pre{background:#f6f6f6;padding:1em;overflow:auto;"
        "font-size:11px}table{border-collapse:collapse;font-size:12px}td,th{padding:2px 10px;text-align:left}"
        "tr:nth-child(even){background:#f6f6f6}</style></head><body>",
        f"<h1>{html.escape(run_dir)}</h1>",
        f"<p>{html.escape(family)} &middot; last logged step {last} &middot; {len(metrics)} metrics"
        f" &middot; {sum(len(v) for v in grids.values())} sample grids</p>",
    ]
    if grids:
        parts.append("<h2>Latest samples</h2><div class='row'>")
        parts += [f"<div class='cell'>{_img(items[-1][1], f'{name} step {items[-1][0]} (latest)')}<br>"
                  f"{html.escape(name)}, step {items[-1][0]}</div>" for name, items in grids.items()]
        parts.append("</div>")
    for title, series in (("Training and evaluation", leading),
                          ("Other curves", {k: v for k, v in curves.items() if k not in leading})):
        if series:
            parts.append(f"<h2>{title}</h2><div class='row'>")
            parts += [f"<div class='cell'>{_img(plot(name, points), name)}</div>" for name, points in series.items()]
            parts.append("</div>")
    if flat:
        parts.append("<h2>Constant or logged once</h2><table><tr><th>metric</th><th>value</th><th>logged</th>"
                     "<th>steps</th></tr>")
        parts += [f"<tr><td>{html.escape(name)}</td><td>{points[-1][1]:.6g}</td><td>{len(points)}&times;</td>"
                  f"<td>{min(s for s, _ in points)}&ndash;{max(s for s, _ in points)}</td></tr>"
                  for name, points in sorted(flat.items())]
        parts.append("</table>")
    if grids:
        parts.append("<h2>Sample grids by step</h2>")
        for name, items in grids.items():
            parts.append(f"<h3>{html.escape(name)}</h3><div class='row'>")
            parts += [f"<div class='cell'>{_img(png, f'{name} step {step}')}<br>step {step}</div>"
                      for step, png in items]
            parts.append("</div>")
    if config:
        parts.append(f"<h2>Config</h2><pre>{html.escape(config)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="kiln report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (local path or URL)")
    parser.add_argument("--out", required=True, help="the HTML file to write (local path or URL)")
    args = parser.parse_args(argv)
    from kiln.trainers.checkpoints.files import write_atomic

    page = render(args.run_dir)
    write_atomic(args.out, page)
    print(f"kiln report: {args.run_dir} -> {args.out} ({len(page) / 1e6:.1f} MB)")
