"""The audit report's page: inline CSS and script, no external resource of any kind.

%TITLE%, %BODY% and %DATA% are filled by audit_report.py (escaped HTML and JSON with "<"
escaped). The script reads only the inline data and writes text with textContent.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="und">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<link rel="icon" href="data:,">
<title>%TITLE%</title>
<style>
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --accent: #2f6fde; }
body { margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem; color: var(--fg);
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans",
    "Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei",
    "WenQuanYi Micro Hei", "Noto Sans CJK JP", "Noto Sans CJK KR", sans-serif; line-height: 1.45; }
h1 { font-size: 1.15rem; word-break: break-all; } h3 { font-size: 1rem; margin: 1rem 0 .3rem; }
code { font-size: .85em; word-break: break-all; }
.integrity { border-left: 6px solid; padding: .3rem 1rem; margin-bottom: 1rem; }
.integrity.ok { border-color: #2e9d5b; background: #eef8f1; } .integrity.bad { border-color: #d23c3c; background: #fdeeee; }
details.record { border: 1px solid var(--line); border-radius: 6px; margin: .8rem 0; padding: .4rem 1rem; }
summary { cursor: pointer; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; font-size: .85rem; }
dt { color: var(--muted); } dd { margin: 0; word-break: break-all; }
.text { white-space: pre-wrap; background: #f6f7f9; padding: .4rem .6rem; border-radius: 4px; }
.note { color: var(--muted); font-size: .85rem; }
table.tops { border-collapse: collapse; font-size: .85rem; } .tops td, .tops th { border-bottom: 1px solid var(--line); padding: .15rem .5rem; text-align: left; }
.controls { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; margin: .5rem 0; }
.hm { display: grid; grid-template-columns: max-content max-content; align-items: start; margin: .5rem 0; overflow-x: auto; }
.hm canvas, .thumbs canvas { image-rendering: pixelated; border: 1px solid var(--line); }
.ylabels div { text-align: right; padding-right: 3px; white-space: pre; overflow: hidden; }
.xlabels { display: flex; } .xlabels div { writing-mode: vertical-rl; white-space: pre; overflow: hidden; text-align: left; }
.thumbs { display: grid; gap: 4px; margin: .5rem 0; }
.thumbs figure { margin: 0; text-align: center; font-size: .7rem; cursor: pointer; }
.thumbs figure.sel canvas { outline: 2px solid var(--accent); }
.seq { line-height: 2; } .seq span { padding: 1px 2px; margin: 1px; border-radius: 3px; white-space: pre; border: 1px solid transparent; }
.seq span.gen { border-color: var(--line); cursor: pointer; font-weight: 600; } .seq span.cur { outline: 2px solid var(--accent); }
ol.sources { font-size: .85rem; }
#tip { position: fixed; pointer-events: none; background: #1d2330; color: #fff; font-size: .75rem; padding: 2px 6px; border-radius: 3px; display: none; }
</style>
</head>
<body>
%BODY%
<div id="tip"></div>
<script type="application/json" id="audit-data">%DATA%</script>
<script>
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("audit-data").textContent);
  const VIRIDIS = [[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],[109,205,89],[180,222,44],[253,231,37]];
  const tip = document.getElementById("tip");
  function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
  function show(t) { return t.replace(/[\u0000-\u001f\u007f]/g, c => c === "\n" ? "\\n" : c === "\t" ? "\\t" : c === "\r" ? "\\r" : "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0")); }
  function bytes(b64) { const s = atob(b64); const a = new Uint8Array(s.length); for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i); return a; }
  function full(b64, S) { const t = bytes(b64), m = new Float32Array(S * S); let k = 0;
    for (let q = 0; q < S; q++) for (let j = 0; j <= q; j++) m[q * S + j] = t[k++] / 255; return m; }
  function color(v) { const x = Math.min(1, Math.max(0, v)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
    return VIRIDIS[i].map((c, n) => Math.round(c + f * (VIRIDIS[i + 1][n] - c))); }
  function paint(canvas, m, S) { canvas.width = S; canvas.height = S; const ctx = canvas.getContext("2d"), img = ctx.createImageData(S, S);
    for (let p = 0; p < S * S; p++) { const c = color(m[p]); img.data.set([c[0], c[1], c[2], 255], 4 * p); } ctx.putImageData(img, 0, 0); }

  function Record(rd, root) {
    const S = rd.positions, labels = rd.labels, cache = new Map();
    const state = { layer: "mean", head: "mean", token: 0 };
    const box = root.querySelector(".interactive");
    function matrix() {
      const key = state.layer + "/" + state.head;
      if (cache.has(key)) return cache.get(key);
      let m;
      if (state.layer === "rollout") m = full(rd.rollout, S);
      else if (state.layer === "mean" && state.head === "mean") m = full(rd.mean, S);
      else {
        const ls = state.layer === "mean" ? rd.layers.map((_, i) => i) : [rd.layers.indexOf(+state.layer)];
        const hs = state.head === "mean" ? rd.heads.map((_, i) => i) : [rd.heads.indexOf(+state.head)];
        m = new Float32Array(S * S);
        for (const l of ls) for (const h of hs) { const a = full(rd.att[l][h], S); for (let p = 0; p < S * S; p++) m[p] += a[p]; }
        for (let p = 0; p < S * S; p++) m[p] /= ls.length * hs.length;
      }
      cache.set(key, m);
      return m;
    }
    const controls = el("div", "controls");
    const layerSel = el("select"), headSel = el("select");
    [["mean", "mean of layers"], ...rd.layers.map(l => [String(l), "layer " + l]), ["rollout", "rollout (all layers)"]]
      .forEach(([v, t]) => { const o = el("option", "", t); o.value = v; layerSel.appendChild(o); });
    [["mean", "mean of heads"], ...rd.heads.map(h => [String(h), "head " + h])]
      .forEach(([v, t]) => { const o = el("option", "", t); o.value = v; headSel.appendChild(o); });
    const l1 = el("label", "", "Layer "), l2 = el("label", "", "Head ");
    l1.appendChild(layerSel); l2.appendChild(headSel); controls.append(l1, l2);
    box.appendChild(el("h3", "", "Token by token: what each generated token attended to"));
    box.appendChild(el("p", "note", "Click a generated (bold) token: sources are shaded by the weight of the row that produced it."));
    box.appendChild(controls);
    const seq = el("div", "seq"), spans = [];
    labels.forEach((t, i) => { const s = el("span", i >= rd.n_prompt ? "gen" : "src", show(t)); s.title = "position " + i; seq.appendChild(s); spans.push(s);
      if (i >= rd.n_prompt) s.addEventListener("click", () => { state.token = i - rd.n_prompt; update(); }); });
    const caption = el("p", "note"), sources = el("ol", "sources");
    box.append(seq, caption, sources);
    box.appendChild(el("h3", "", "Heatmap (rows: query positions, columns: key positions)"));
    const hm = el("div", "hm"), ylab = el("div", "ylabels"), canvas = el("canvas"), corner = el("div"), xlab = el("div", "xlabels");
    const cell = Math.max(2, Math.min(18, Math.floor(640 / S))), font = Math.min(12, cell - 2), withLabels = cell >= 8;
    canvas.style.width = canvas.style.height = (S * cell) + "px";
    for (let i = 0; i < S; i++) {
      if (!withLabels) break;
      const y = el("div", "", show(labels[i])); y.style.height = y.style.lineHeight = cell + "px"; y.style.fontSize = font + "px"; ylab.appendChild(y);
      const x = el("div", "", show(labels[i])); x.style.width = cell + "px"; x.style.fontSize = font + "px"; x.style.maxHeight = "7em"; xlab.appendChild(x);
    }
    hm.append(ylab, canvas, corner, xlab);
    box.appendChild(hm);
    if (!withLabels) box.appendChild(el("p", "note", S + " positions: hover the heatmap for token labels."));
    canvas.addEventListener("mousemove", ev => { const r = canvas.getBoundingClientRect();
      const q = Math.floor((ev.clientY - r.top) / r.height * S), k = Math.floor((ev.clientX - r.left) / r.width * S);
      if (q < 0 || k < 0 || q >= S || k >= S) return;
      tip.textContent = show(labels[q]) + "@" + q + " → " + show(labels[k]) + "@" + k + ": " + matrix()[q * S + k].toFixed(3);
      tip.style.left = (ev.clientX + 12) + "px"; tip.style.top = (ev.clientY + 12) + "px"; tip.style.display = "block"; });
    canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    box.appendChild(el("h3", "", "Every stored layer and head (click to select)"));
    const thumbs = el("div", "thumbs"), figs = [];
    thumbs.style.gridTemplateColumns = "repeat(" + rd.heads.length + ", max-content)";
    rd.layers.forEach((l, li) => rd.heads.forEach((h, hi) => {
      const f = el("figure"), c = el("canvas"); c.style.width = c.style.height = "72px";
      paint(c, full(rd.att[li][hi], S), S);
      f.append(c, el("figcaption", "", "L" + l + " H" + h));
      f.addEventListener("click", () => { state.layer = String(l); state.head = String(h); layerSel.value = state.layer; headSel.value = state.head; update(); });
      thumbs.appendChild(f); figs.push([f, String(l), String(h)]);
    }));
    box.appendChild(thumbs);
    layerSel.addEventListener("change", () => { state.layer = layerSel.value; update(); });
    headSel.addEventListener("change", () => { state.head = headSel.value; update(); });
    function update() {
      headSel.disabled = state.layer === "rollout";
      const m = matrix(), q = rd.n_prompt - 1 + state.token;
      paint(canvas, m, S);
      spans.forEach((s, i) => { s.classList.toggle("cur", i === rd.n_prompt + state.token);
        const w = i < S && i <= q ? m[q * S + i] : 0; s.style.background = w > 0 ? "rgba(47,111,222," + Math.min(1, w * 1.5).toFixed(3) + ")" : ""; });
      sources.replaceChildren();
      const order = Array.from({ length: q + 1 }, (_, i) => i).sort((a, b) => m[q * S + b] - m[q * S + a]).slice(0, 8);
      caption.textContent = ("generated token " + state.token + " " + show(labels[rd.n_prompt + state.token]) + " (row " + q + "), " + layerSel.selectedOptions[0].textContent + (state.layer === "rollout" ? "" : ", " + headSel.selectedOptions[0].textContent) + ":");
      order.forEach(k => sources.appendChild(el("li", "", show(labels[k]) + "@" + k + "  " + m[q * S + k].toFixed(3))));
      figs.forEach(([f, l, h]) => f.classList.toggle("sel", l === state.layer && h === state.head));
    }
    update();
  }

  const roots = document.querySelectorAll("details.record");
  DATA.records.forEach((rd, n) => {
    const root = roots[n];
    let built = false;
    const build = () => { if (!built && root.open) { built = true; Record(rd, root); } };
    root.addEventListener("toggle", build);
    build();
  });
  document.body.dataset.ready = "1";
})();
</script>
</body>
</html>
"""
