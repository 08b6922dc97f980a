"""``report.html``: one self-contained page (no network; PNGs and data embedded).

The heat maps are HTML tables whose cells are coloured like the PNGs (same data, same colour
map and scale). Clicking a cell shows that layer pair's statistics (summary.csv, pivot.csv
per image) and its top map pairs with thumbnails. Plain JavaScript, no libraries.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import seaborn  # noqa: F401 - registers the colour maps ("rocket") used by the heat maps
from PIL import Image

from mapsim.io.results import POOLED_IMAGE, ResultsDir
from mapsim.plots.capture import thumb_key
from mapsim.plots.chance import BELOW_CHANCE
from mapsim.plots.report_tables import findings_html, pair_extras, reading, significance_html
from mapsim.plots.heatmaps import HeatmapSet, annotations
from mapsim.plots.io import atomic_write_bytes

TOP_PAIRS = 8
THUMB_CSS_PX = 72
#: a heat-map cell of the report is a square of this many CSS pixels, its value this size
#: and its interval (and chance mark) below it this size
CELL_CSS_PX = 80
VALUE_FONT_CSS_PX = 15
CELL_FONT_CSS_PX = 12
#: the pictures under "More pictures" are embedded at most this wide and tall (pixels), as
#: JPEG: sized for the page, not copies of the full-resolution PNGs in plots/
PAGE_IMAGE_PX = (720, 1440)
PAGE_IMAGE_QUALITY = 75
#: at most this many of them per kind (histogram, matrix, groups); the rest are named
MAX_PAGE_IMAGES = 24
#: the kinds of pictures embedded under "More pictures" (the heat maps are tables)
PAGE_KINDS = ("histogram", "matrix", "groups")


def _colour(cmap: Any, value: float, vmin: float, vmax: float) -> tuple[str, str]:
    """(background, text colour) of one cell."""
    if value != value:
        return "#d9d9d9", "#333"
    x = 0.0 if vmax == vmin else min(max((value - vmin) / (vmax - vmin), 0.0), 1.0)
    r, g, b, _ = cmap(x)
    text = "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "#000"
    return matplotlib.colors.to_hex((r, g, b)), text


def page_image(png: bytes) -> str:
    """A PNG as a JPEG data URI no larger than :data:`PAGE_IMAGE_PX`."""
    with Image.open(io.BytesIO(png)) as picture:
        picture = picture.convert("RGB")
        picture.thumbnail(PAGE_IMAGE_PX, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=PAGE_IMAGE_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumb_uri(arr: np.ndarray) -> str:
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr.mean(axis=0)
    finite = np.isfinite(arr)
    low, high = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0, 1)
    if high <= low:
        scaled = np.zeros(arr.shape)
    else:
        scaled = (np.where(finite, arr, low) - low) / (high - low)
    buffer = io.BytesIO()
    # JPEG: a thumbnail of a noisy map is a third of its PNG's size, and looks the same
    Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L").save(
        buffer, "JPEG", quality=PAGE_IMAGE_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in frame.to_dict("records"):
        out.append({k: (None if isinstance(v, float) and v != v else
                        v.item() if hasattr(v, "item") else v) for k, v in rec.items()})
    return out


class _PairIndex:
    """Layer pairs clicked in the report, with their statistics and top pairs."""

    def __init__(self, results: ResultsDir) -> None:
        self.results = results
        self.keys: dict[tuple[str, ...], int] = {}
        self.pairs: list[dict[str, Any]] = []
        self.thumbs: dict[str, str] = {}
        saved = results.saved_images("thumbnails")
        self.thumb_image = saved[0] if saved else None
        self.thumb_arrays = results.thumbnails(self.thumb_image) if self.thumb_image else {}

    def index(self, metric: str, statistic: str, a: str, la: str, b: str, lb: str) -> int:
        layer_level = statistic == "value"
        key = (metric, a, la, b, lb, "layer" if layer_level else "map")
        if key not in self.keys:
            self.keys[key] = len(self.pairs)
            self.pairs.append(self._build(metric, a, la, b, lb, layer_level))
        return self.keys[key]

    def _rows(self, table: str, metric: str, a: str, la: str, b: str, lb: str) -> pd.DataFrame:
        rows = self.results.by_pair(table).get((metric, a, la, b, lb))
        return pd.DataFrame() if rows is None else rows

    def _build(self, metric: str, a: str, la: str, b: str, lb: str,
               layer_level: bool) -> dict[str, Any]:
        r = self.results
        pair: dict[str, Any] = {"metric": metric, "model_a": a, "layer_a": la, "model_b": b,
                                "layer_b": lb, "layer_level": layer_level}
        if layer_level:
            rows = self._rows("layer_similarity", metric, a, la, b, lb)
            if rows.empty and r.metric(metric).symmetric:
                rows = self._rows("layer_similarity", metric, b, lb, a, la)
            keep = [c for c in ("image", "value", "reason") if c in rows]
            pair["values"] = _records(rows[keep])
            return pair
        summary = self._rows("summary", metric, a, la, b, lb)
        keep = [c for c in ("statistic", "mean", "std", "n_images", "ci_low", "ci_high")
                if c in summary]
        pair["summary"] = _records(summary[keep])
        per_image = self._rows("pivot", metric, a, la, b, lb)
        cols = ["image", "n_maps", "n_dead", "n_live", "best_mean", "best_std", "n_well",
                "pct_well"]
        pair["images"] = _records(per_image[[c for c in cols if c in per_image]])
        pair["thumb_image"] = self.thumb_image
        pair["top"] = self._top(metric, a, la, b, lb)
        return pair

    def _top(self, metric: str, a: str, la: str, b: str, lb: str) -> list[dict[str, Any]]:
        rows = self._rows("max", metric, a, la, b, lb)
        if rows.empty or self.thumb_image is None:
            return []
        rows = rows[(rows["image"].astype(str) == self.thumb_image)].dropna(subset=["value"])
        higher = self.results.metric(metric).higher_is_more_similar
        rows = rows.sort_values(["value", "map_a"], ascending=[not higher, True]).head(TOP_PAIRS)
        top = []
        for rec in rows.itertuples(index=False):
            item = {"map_a": int(rec.map_a), "map_b": int(rec.map_b), "value": float(rec.value),
                    "well": bool(getattr(rec, "well_correlated", False))}
            item["thumb_a"] = self._thumb(a, la, int(rec.map_a))
            item["thumb_b"] = self._thumb(b, lb, int(rec.map_b))
            top.append(item)
        return top

    def _thumb(self, model: str, layer: str, map_id: int) -> str | None:
        arrays = self.thumb_arrays.get(thumb_key(model, layer))
        if arrays is None or map_id >= len(arrays):
            return None
        key = f"{model}|{layer}|{map_id}"
        if key not in self.thumbs:
            self.thumbs[key] = _thumb_uri(arrays[map_id])
        return key


def _heatmap_table(hs: HeatmapSet, pairs: _PairIndex) -> str:
    cmap = matplotlib.colormaps[hs.cmap]
    # one row of panels per compared model (as in the PNGs): every cell the same square
    rows_of: dict[str, list[str]] = {p.model_a: [] for p in hs.panels}
    for panel in hs.panels:
        text = annotations(panel, hs.fmt)
        cols = [str(c) for c in panel.mean.columns]
        head = "".join(f"<th class='col'>{html.escape(c)}</th>" for c in cols)
        # a fixed table layout: no label or text can widen a column, so cells stay squares
        widths = f"<col style='width:{CELL_CSS_PX}px'>" * len(cols)
        corner = 12 + CELL_FONT_CSS_PX * max(len(str(r)) for r in panel.mean.index) * 2 // 3
        body = []
        for i, row in enumerate(panel.mean.index):
            cells = []
            for j, col in enumerate(cols):
                value = float(panel.mean.iat[i, j])
                bg, fg = _colour(cmap, value, hs.vmin, hs.vmax)
                idx = pairs.index(hs.metric, hs.statistic, panel.model_a, str(row),
                                  panel.model_b, col)
                head_line, _, rest = str(text[i, j]).partition("\n")
                label = f"<b class='v'>{html.escape(head_line)}</b>"
                if rest:
                    label += ("<br><span class='sub'>"
                              + html.escape(rest).replace("\n", "<br>") + "</span>")
                marked = " nochance" if BELOW_CHANCE in rest else ""
                cells.append(
                    f"<td class='cell{marked}' style='background:{bg};color:{fg}' data-pair='{idx}' "
                    f"data-layers='{html.escape(f'{panel.model_a}:{row} / {panel.model_b}:{col}')}'"
                    f" title='{html.escape(str(row))} / {html.escape(col)}'>{label}</td>")
            body.append(f"<tr><th class='row'>{html.escape(str(row))}</th>{''.join(cells)}</tr>")
        rows_of[panel.model_a].append(
            f"<div class='panel'><div class='ptitle'>{html.escape(panel.title)}</div>"
            f"<table class='hm' style='width:{corner + len(cols) * CELL_CSS_PX}px'>"
            f"<colgroup><col style='width:{corner}px'>"
            f"{widths}</colgroup>"
            f"<tr><th></th>{head}</tr>{''.join(body)}</table>"
            f"<div class='pcap'>rows: {html.escape(panel.model_a)} layer (maps); "
            f"columns: {html.escape(panel.model_b)} layer (partner)</div></div>")
    low, high = (format(v, hs.fmt) for v in (hs.vmin, hs.vmax))
    stops = ", ".join(matplotlib.colors.to_hex(cmap(x)) for x in np.linspace(0, 1, 11))
    legend = (f"<div class='legend'><span>{low}</span><span class='bar' "
              f"style='background:linear-gradient(to right, {stops})'></span><span>{high}</span>"
              f" <span class='lbl'>{html.escape(hs.cbar_label)}</span></div>")
    rows = "".join(f"<div class='prow'>{''.join(parts)}</div>" for parts in rows_of.values())
    return f"<div class='panels'>{rows}</div>{legend}"


def _summary_html(results: ResultsDir) -> str:
    info = results.info
    spec = info.get("spec", {})
    rows = [("run", results.name), ("mapsim", info.get("mapsim_version", "?")),
            ("images", info.get("n_images", "?")), ("device", info.get("device", "?")),
            ("comparisons", ", ".join(f"{a} × {b}" for a, b in info.get("comparisons", []))),
            ("dead maps", f"{info.get('dead_maps', {}).get('policy', '?')} (std ≤ "
                          f"{info.get('dead_maps', {}).get('dead_std', '?')})"),
            ("images spec", json.dumps(spec.get("images", {}))),
            ("total time", f"{info.get('timings_s', {}).get('total', '?')} s")]
    for m in info.get("metrics", []):
        kind = "similarity" if m.get("higher_is_more_similar", True) else "distance"
        rows.append((f"metric {m.get('label')}",
                     f"{m.get('name')} ({kind}, {m.get('granularity')}-level) "
                     f"{json.dumps(m.get('params', {}))}"))
    for a in info.get("aggregators", []):
        if a.get("params"):
            rows.append((f"aggregator {a['name']}", json.dumps(a["params"])))
    for name, model in info.get("models", {}).items():
        rows.append((f"model {name}", f"{model.get('parameters', '?')} parameters; layers "
                     + ", ".join(f"{k}={v}" if k != v else k
                                 for k, v in model.get("layers", {}).items())))
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table class='info'>{body}</table>"


def prepare_report(results: ResultsDir, sets: list[HeatmapSet]) -> dict[str, str]:
    """Every part of the report that the pictures' files do not change (the heat maps as
    tables, findings, data), so it can be made while the pictures are drawn."""
    pairs = _PairIndex(results)
    groups: dict[tuple[str, str], list[HeatmapSet]] = {}
    for hs in sets:
        groups.setdefault((hs.metric, hs.statistic), []).append(hs)
    sections = []
    for n, ((metric, statistic), members) in enumerate(groups.items()):
        options, bodies = [], []
        for k, hs in enumerate(members):
            name = ("mean over images" if hs.image is None else
                    "pooled over images" if hs.image == POOLED_IMAGE else f"image {hs.image}")
            options.append(f"<option value='{k}'>{html.escape(name)}</option>")
            hidden = "" if k == 0 else " hidden"
            bodies.append(f"<div class='set' data-set='{k}'{hidden}><h4>"
                          f"{html.escape(hs.title).replace(chr(10), '<br>')}</h4>"
                          f"{_heatmap_table(hs, pairs)}</div>")
        sections.append(
            f"<div class='group' id='hm-{n}'><h3>{html.escape(metric)}: "
            f"{html.escape(statistic)}</h3><label>show <select class='setsel'>"
            f"{''.join(options)}</select></label>{''.join(bodies)}</div>")
    extras = pair_extras(results)
    for pair in pairs.pairs:
        pair.update(extras.get(tuple(pair[k] for k in ("metric", "model_a", "layer_a",
                                                          "model_b", "layer_b")), {}))
    data = {"pairs": pairs.pairs, "thumbs": pairs.thumbs}
    if pairs.thumb_image is not None and "__input__" in pairs.thumb_arrays:
        data["input"] = _thumb_uri(pairs.thumb_arrays["__input__"])
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return dict(
        title=html.escape(f"mapsim report: {results.name}"),
        summary=_summary_html(results),
        findings=findings_html(results) + significance_html(results), reading=reading(results),
        heatmaps="".join(sections) or "<p>No heat maps: the run wrote no pivot or layer "
        "similarity tables.</p>",
        data=payload,
        css=_CSS.replace("{thumb}", str(THUMB_CSS_PX)).replace("{cell}", str(CELL_CSS_PX))
        .replace("{cell_font}", str(CELL_FONT_CSS_PX))
        .replace("{value_font}", str(VALUE_FONT_CSS_PX)), js=_JS)


def build_report(results: ResultsDir, sets: list[HeatmapSet], plots_dir: Path,
                 figures: list[dict[str, str]], pages: dict[str, str] | None = None,
                 prepared: dict[str, str] | None = None) -> str:
    """The report's HTML text; ``pages``: page-sized copies of pictures already made (file
    name -> data URI), the others are made here from plots/; ``prepared``: what
    :func:`prepare_report` returned for these results (made here when None)."""
    pages = pages or {}
    prepared = prepared if prepared is not None else prepare_report(results, sets)
    figure_html = []
    for kind, title in zip(PAGE_KINDS, ("Best-partner distributions",
                                        "Every map pair (first image(s))",
                                        "Well-correlated groups")):
        chosen = [f for f in figures if f["kind"] == kind]
        if not chosen:
            continue
        shown, rest = chosen[:MAX_PAGE_IMAGES], chosen[MAX_PAGE_IMAGES:]
        imgs = "".join(
            f"<figure><img alt='{html.escape(f['caption'])}' src='"
            f"{pages.get(f['file']) or page_image((plots_dir / f['file']).read_bytes())}'>"
            "<figcaption>"
            f"{html.escape(f['caption'])} (plots/{html.escape(f['file'])})</figcaption></figure>"
            for f in shown)
        if rest:
            imgs += ("<p>Not embedded (see plots/): "
                     + ", ".join(html.escape(f["file"]) for f in rest) + "</p>")
        figure_html.append(f"<details><summary>{title} ({len(chosen)})</summary>{imgs}</details>")
    return _TEMPLATE.format(figures="".join(figure_html), **prepared)


def write_report(results: ResultsDir, sets: list[HeatmapSet], plots_dir: Path,
                 figures: list[dict[str, str]], pages: dict[str, str] | None = None,
                 prepared: dict[str, str] | None = None) -> Path:
    """Write ``report.html`` into the results directory atomically; returns its path."""
    path = results.root / "report.html"
    atomic_write_bytes(path, build_report(results, sets, plots_dir, figures, pages, prepared)
                       .encode("utf-8"))
    return path


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1800px}
h1{font-size:1.4em}h2{border-bottom:1px solid #ccc;margin-top:1.5em}h3{margin-bottom:.2em}
h4{font-weight:normal;font-size:.9em;margin:.4em 0}
table.info{border-collapse:collapse;font-size:.85em}
table.info th,table.info td{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
.panels{display:flex;flex-direction:column;gap:1em}
.prow{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}
.ptitle{font-weight:bold;font-size:.9em;margin-bottom:.2em}
table.hm{border-collapse:collapse;font-size:{cell_font}px;table-layout:fixed}
.panel{display:inline-block}
.pcap{width:0;min-width:100%;font-size:12px;color:#555;padding-top:.3em}
table.hm th{font-weight:normal;padding:2px 4px}
table.hm th.col{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;
white-space:nowrap;padding:4px 0}
td.cell{width:{cell}px;height:{cell}px;min-width:{cell}px;padding:0;text-align:center;
cursor:pointer;border:1px solid #fff;line-height:1.15}
td.cell .v{font-size:{value_font}px}
td.cell.nochance{outline:2px dashed currentColor;outline-offset:-5px}
td.cell:hover,td.cell.chosen{outline:3px solid #e4572e;outline-offset:-3px}
p.reading{max-width:70em;font-size:.9em}
.legend{display:flex;align-items:center;gap:.4em;font-size:.8em;margin:.5em 0}
.legend .bar{display:inline-block;width:200px;height:12px}
.main{display:grid;grid-template-columns:minmax(0,1fr) minmax(300px,38%);gap:1em;align-items:start}
#detail{border:2px solid #e4572e;padding:.6em 1em;min-height:3em;background:#fffaf8;
position:sticky;top:.5em;max-height:calc(100vh - 1em);overflow:auto}
#detail table{border-collapse:collapse;font-size:.8em;margin:.3em 0}
#detail td,#detail th{border:1px solid #ddd;padding:1px 4px;white-space:nowrap}
.pairs{display:flex;flex-wrap:wrap;gap:.8em}
.mpair{border:1px solid #ccc;padding:.3em;font-size:.75em;text-align:center}
.mpair img,.input img{width:{thumb}px;image-rendering:pixelated;margin:1px}
figure{display:inline-block;margin:.5em}figure img{max-width:100%}
figcaption{font-size:.8em;color:#555}
"""

_JS = """
const DATA = JSON.parse(document.getElementById('mapsim-data').textContent);
function esc(s){return String(s).replace(/[&<>'"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;',"'":'&#39;','"':'&quot;'}[c]));}
function num(v,d){return v===null||v===undefined?'—':(typeof v==='number'?v.toFixed(d):esc(v));}
function table(rows,cols,digits){
  let h='<table><tr>'+cols.map(c=>'<th>'+esc(c)+'</th>').join('')+'</tr>';
  for(const r of rows){h+='<tr>'+cols.map(c=>'<td>'+num(r[c],digits[c]===undefined?3:digits[c])+'</td>').join('')+'</tr>';}
  return h+'</table>';
}
function img(key){return key&&DATA.thumbs[key]?'<img src="'+DATA.thumbs[key]+'">':'<i>no thumbnail</i>';}
function show(i){
  const p=DATA.pairs[i]; const d=document.getElementById('detail');
  d.dataset.pair=i;
  let h='<h3 id="detail-title">'+esc(p.metric)+': '+esc(p.model_a)+' '+esc(p.layer_a)+' → '+esc(p.model_b)+' '+esc(p.layer_b)+'</h3>';
  if(p.layer_level){
    h+='<p>Layer-level values per image:</p>'+table(p.values,Object.keys(p.values[0]||{image:1,value:1}),{});
  } else {
    const sc=['statistic','mean','std','n_images'].concat(p.summary.length&&'ci_low' in p.summary[0]?['ci_low','ci_high']:[]);
    h+='<p>Across images (summary.csv):</p>'+table(p.summary,sc,{n_images:0});
    if(p.baselines){h+='<p>Chance levels (baselines.csv):</p>'+table(p.baselines.map(b=>Object.assign({},b,{above:b.above===null?null:(b.above?'yes':'no')})),['statistic','baseline','observed','mean','p95','n','above'],{n:0});}
    if(p.significant){h+='<p>Maps whose best partner is significant after Benjamini-Hochberg: <b>'+p.significant[0]+' of '+p.significant[1]+'</b></p>';}
    h+='<p>Per image (pivot.csv):</p>'+table(p.images,['image','n_maps','n_dead','n_live','best_mean','best_std','n_well','pct_well'],{n_maps:0,n_dead:0,n_live:0,n_well:0,pct_well:1});
    if(p.top.length){
      h+='<p>Top '+p.top.length+' map pairs in image '+esc(p.thumb_image)+' (best partner of each map of '+esc(p.layer_a)+'):</p>';
      if(DATA.input){h+='<div class="input">input '+'<img src="'+DATA.input+'"></div>';}
      h+='<div class="pairs">'+p.top.map(t=>'<div class="mpair">'+img(t.thumb_a)+img(t.thumb_b)+'<br>'+esc(p.layer_a)+' #'+t.map_a+' → '+esc(p.layer_b)+' #'+t.map_b+'<br><b>'+t.value.toFixed(3)+'</b>'+(t.well?' ✓':'')+'</div>').join('')+'</div>';
    } else { h+='<p><i>No thumbnails saved for this run (run with output.plots or output.report).</i></p>'; }
  }
  d.innerHTML=h;
  document.querySelectorAll('td.cell.chosen').forEach(c=>c.classList.remove('chosen'));
  document.querySelectorAll('td.cell[data-pair="'+i+'"]').forEach(c=>c.classList.add('chosen'));
}
document.querySelectorAll('td.cell').forEach(td=>td.addEventListener('click',()=>{show(+td.dataset.pair);}));
document.querySelectorAll('select.setsel').forEach(sel=>sel.addEventListener('change',()=>{
  sel.closest('.group').querySelectorAll('.set').forEach(s=>{s.hidden=s.dataset.set!==sel.value;});
}));
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title><style>{css}</style></head>
<body><h1>{title}</h1>
<h2>Run</h2>{summary}
<h2>Findings</h2>{reading}{findings}
<h2>Heat maps</h2>
<p>Click a cell to see that layer pair's statistics and its top map pairs (right).
Grey cells are undefined.</p>
<div class="main"><div class="maps">{heatmaps}</div>
<div id="detail"><i>Click a heat-map cell.</i></div></div>
<h2>More pictures</h2>{figures}
<script type="application/json" id="mapsim-data">{data}</script>
<script>{js}</script>
</body></html>
"""
