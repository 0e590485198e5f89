/* minidiff explain: draws the page from window.MINIDIFF_EXPLAIN (data.js, written by minidiff/explain.py).
   Plain JavaScript, no libraries; every figure is SVG or a canvas drawn here. */
(function () {
  "use strict";
  var D = window.MINIDIFF_EXPLAIN;
  var SVGNS = "http://www.w3.org/2000/svg";
  var C = { blue: "#0072B2", sky: "#56B4E9", orange: "#E69F00", vermillion: "#D55E00", green: "#009E73",
            purple: "#CC79A7", grey: "#e6e8ec", ink: "#1d2330", muted: "#5a6372", line: "#c9ced6" };
  var $ = function (id) { return document.getElementById(id); };

  // -- helpers -----------------------------------------------------------------------------------
  function el(tag, attrs, parent, text) {
    var node = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function svgTitle(svg, id, title, desc) {
    el("title", { id: id + "-title" }, svg, title);
    el("desc", { id: id + "-desc" }, svg, desc);
  }
  function fillSelect(select, values, label, keep) {
    var old = keep !== undefined ? keep : select.value;
    clear(select);
    values.forEach(function (v) {
      var o = document.createElement("option");
      o.value = String(v); o.textContent = label ? label(v) : String(v);
      select.appendChild(o);
    });
    if (values.map(String).indexOf(String(old)) >= 0) select.value = String(old);
    return select.value;
  }
  function card(parent, value, label, wide) {
    var div = document.createElement("div");
    div.className = "card" + (wide ? " wide" : "");
    if (value !== null) { var v = document.createElement("div"); v.className = "value"; v.textContent = value; div.appendChild(v); }
    var l = document.createElement("div"); l.className = "label"; l.textContent = label; div.appendChild(l);
    parent.appendChild(div);
  }
  function mega(n) { return n >= 1e9 ? (n / 1e9).toFixed(2) + " G" : (n / 1e6).toFixed(1) + " M"; }
  function pct(x) { return (100 * x).toFixed(0) + "%"; }
  function unique(list) { var seen = []; list.forEach(function (v) { if (seen.indexOf(v) < 0) seen.push(v); }); return seen; }
  function shape(s) { return s ? s.join("\u00d7") : ""; }
  var SCHEDULE_NAMES = { uniform: "uniform", nonuniform: "non-uniform", calibrated: "calibrated", adaptive: "adaptive" };

  function sprite(uri, onload) {  // a PNG sheet: one row of images per step
    var img = new Image();
    img.onload = function () { onload(img); };
    img.src = uri;
    return img;
  }
  function narrow() { return window.innerWidth < 640; }
  function perLine() { var n = D.settings.batch; return narrow() && n > 4 ? Math.ceil(n / 2) : n; }
  function drawRow(canvas, img, row) {  // row `row` of a sheet interleaved by pixel row (explain.py png_data_uri)
    var s = D.model.size, n = D.settings.batch, cols = perLine(), lines = Math.ceil(n / cols), g = 1;  // g: gap
    var w = cols * (s + g) - g, h = lines * (s + g) - g;
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w; canvas.height = h; canvas.style.maxWidth = (cols * 120) + "px";
    }
    var ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, w, h);
    if (!img || !img.complete || !img.naturalHeight) return;
    var rows = img.naturalHeight / s;
    for (var k = 0; k < n; k++) {
      var dx = (k % cols) * (s + g), dy = Math.floor(k / cols) * (s + g);
      for (var y = 0; y < s; y++) ctx.drawImage(img, k * s, y * rows + row, s, 1, dx, dy + y, s, 1);
    }
  }

  // -- the header ----------------------------------------------------------------------------------
  function header() {
    var m = D.model, s = D.settings;
    $("model-line").textContent = "Model: " + (m.name || "a minidiff model") + " (" + (m.kind === "dit" ? "a DiT" : "a U-Net") +
      ", " + (m.parameters / 1e6).toFixed(2) + "M parameters, " + m.size + "\u00d7" + m.size + " images). Sampler: " +
      s.sampler.toUpperCase() + ", " + s.steps + " steps, " + s.batch + " samples, seed " + s.seed + ".";
  }

  // -- 1. the network ------------------------------------------------------------------------------
  var net = { branch: 0, interval: 3 };

  function networkSection() {
    var N = D.network;
    $("network-text").textContent = N.kind === "unet"
      ? "A U-Net encodes the image down to a small, deep feature (left, top to bottom), then decodes it back up " +
        "(right, bottom to top). Skip connections carry each encoder output straight across to the decoder. DeepCache's idea: " +
        "a full step runs everything and keeps the feature entering one decoder block; the shallow steps after it run " +
        "only the blocks above that cut, fed by the skip connections, and reuse the kept feature for the rest. The cache branch picks the cut."
      : "A DiT (diffusion transformer) is a stack of blocks that each add their result to one residual stream. A full step " +
        "runs every block and keeps what the middle blocks added in total; a shallow step runs only the first and last " +
        "blocks and adds the kept residual in place of the middle ones. The cache branch picks how many blocks stay live.";
    fillSelect($("net-branch"), N.branches.map(function (b) { return b.branch; }), function (b) {
      var x = N.branches[b]; return "branch " + b + " (" + pct(x.ratio) + " of the MACs)";
    });
    $("net-branch").addEventListener("change", function () { net.branch = +this.value; drawNetwork(); });
    $("net-interval").addEventListener("input", function () { net.interval = +this.value; $("net-interval-out").textContent = this.value; drawNetwork(); });
    drawNetwork();
  }

  function drawNetwork() {
    var N = D.network, svg = $("net-svg"), b = N.branches[net.branch];
    clear(svg);
    var live = {}; b.live.forEach(function (name) { live[name] = true; });
    var pos = N.kind === "unet" ? layoutUnet(N) : layoutDit(N);
    svg.setAttribute("viewBox", "0 0 " + pos.width + " " + pos.height);
    svg.setAttribute("width", pos.width);
    svgTitle(svg, "net-svg", "The " + (N.kind === "unet" ? "U-Net" : "DiT") + " at cache branch " + b.branch,
      "A shallow step runs " + b.live.join(", ") + " and reuses the cached output of " + b.cached + "; every other block is skipped.");
    el("defs", {}, svg).innerHTML = '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="' + C.muted + '"/></marker>' +
      '<marker id="arrow-live" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="' + C.blue + '"/></marker>';
    pos.edges.forEach(function (e) {
      var on = live[e.from] && live[e.to];
      el("path", { d: e.d, fill: "none", stroke: on ? C.blue : C.line, "stroke-width": on ? 2.2 : 1.4,
                   "stroke-dasharray": e.skip && !on ? "4 3" : "", "marker-end": on ? "url(#arrow-live)" : "url(#arrow)" }, svg);
      if (e.label) el("text", { x: e.lx, y: e.ly, "text-anchor": "middle", "font-size": 11, fill: on ? C.blue : C.muted }, svg, e.label);
    });
    N.blocks.forEach(function (block) {
      var p = pos.boxes[block.name], on = live[block.name];
      var g = el("g", { "data-block": block.name, "class": on ? "block live" : "block skipped" }, svg);
      el("rect", { x: p.x, y: p.y, width: p.w, height: p.h, rx: 6, fill: on ? C.blue : C.grey,
                   stroke: on ? C.blue : "#aab1bb", "stroke-dasharray": on ? "" : "4 3" }, g);
      el("text", { x: p.x + 10, y: p.y + p.h / 2 + 4.5, "font-size": 13, "font-weight": 700, fill: on ? "#fff" : C.ink }, g, block.name);
      el("text", { x: p.x + p.w - 10, y: p.y + p.h / 2 + 4.5, "font-size": 11.5, "text-anchor": "end", fill: on ? "#fff" : C.muted }, g,
         (narrow() ? "" : block.label + "  ") + shape(block.shape));
    });
    if (pos.decorate) pos.decorate(svg);
    var c = pos.cache;  // where the reused feature enters
    el("circle", { cx: c.x, cy: c.y, r: 9, fill: C.orange, stroke: C.ink, "stroke-width": 1.2 }, svg);
    el("text", { x: c.x, y: c.y + 4, "text-anchor": "middle", "font-size": 11, "font-weight": 700, fill: C.ink }, svg, "C");
    if (!c.hide) el("text", { x: c.tx, y: c.ty, "text-anchor": c.anchor, "font-size": 12, "font-weight": 700, fill: C.ink }, svg, "\u2190 cached: " + b.cached);
    networkStats(b);
  }

  function layoutUnet(N) {  // encoder down the left, decoder up the right, skips straight across
    var enc = N.blocks.filter(function (x) { return x.group === "enc"; });
    var dec = N.blocks.filter(function (x) { return x.group === "dec"; });
    var compact = narrow(), n = enc.length, rowH = 40, boxH = 30, w = compact ? 150 : 250, gap = compact ? 56 : 110, top = 12;
    var width = 2 * w + gap + (compact ? 20 : 150), boxes = {}, edges = [];
    enc.forEach(function (x, i) { boxes[x.name] = { x: 10, y: top + i * rowH, w: w, h: boxH }; });
    dec.forEach(function (x, i) { boxes[x.name] = { x: 10 + w + gap, y: top + (n - 1 - i) * rowH, w: w, h: boxH }; });
    boxes.mid = { x: 10 + (w + gap) / 2, y: top + n * rowH + 8, w: w, h: boxH };
    function down(a, b) { var p = boxes[a], q = boxes[b]; return "M" + (p.x + 30) + "," + (p.y + p.h) + " L" + (q.x + 30) + "," + (q.y - 1); }
    function up(a, b) { var p = boxes[a], q = boxes[b]; return "M" + (p.x + p.w - 30) + "," + p.y + " L" + (q.x + q.w - 30) + "," + (q.y + q.h + 1); }
    for (var i = 0; i + 1 < n; i++) edges.push({ from: enc[i].name, to: enc[i + 1].name, d: down(enc[i].name, enc[i + 1].name) });
    var m = boxes.mid, last = boxes[enc[n - 1].name], first = boxes[dec[0].name];
    edges.push({ from: enc[n - 1].name, to: "mid", d: "M" + (last.x + 30) + "," + (last.y + last.h) + " L" + (last.x + 30) + "," + (m.y + m.h / 2) + " L" + (m.x - 1) + "," + (m.y + m.h / 2) });
    edges.push({ from: "mid", to: dec[0].name, d: "M" + (m.x + m.w) + "," + (m.y + m.h / 2) + " L" + (first.x + first.w - 30) + "," + (m.y + m.h / 2) + " L" + (first.x + first.w - 30) + "," + (first.y + first.h + 1) });
    for (var j = 0; j + 1 < n; j++) edges.push({ from: dec[j].name, to: dec[j + 1].name, d: up(dec[j].name, dec[j + 1].name) });
    N.skips.forEach(function (s, k) {
      var p = boxes[s[0]], q = boxes[s[1]], y = p.y + p.h / 2;
      edges.push({ from: s[0], to: s[1], skip: true, d: "M" + (p.x + p.w) + "," + y + " L" + (q.x - 1) + "," + y,
                   label: "skip " + k, lx: p.x + p.w + gap / 2, ly: y - 5 });
    });
    var b = D.network.branches[net.branch], cut = boxes[b.live.filter(function (x) { return x.indexOf("dec") === 0; })[0]];
    var cache = { x: cut.x + cut.w - 30, y: cut.y + cut.h + 5, tx: cut.x + cut.w + 8, ty: cut.y + cut.h + 9, anchor: "start",
                  hide: compact };
    return { width: width, height: m.y + m.h + 14, boxes: boxes, edges: edges, cache: cache };
  }

  function layoutDit(N) {  // the residual stream as a vertical line; each block reads it and adds back (+)
    var rowH = 40, boxH = 30, w = 230, top = 16, stream = 190, x0 = 230, boxes = {}, edges = [], depth = N.blocks.length;
    N.blocks.forEach(function (x, i) { boxes[x.name] = { x: x0, y: top + i * rowH, w: w, h: boxH }; });
    N.blocks.forEach(function (x, i) {
      var y = top + i * rowH + boxH / 2;
      edges.push({ from: x.name, to: x.name, d: "M" + stream + "," + (y - 8) + " L" + (x0 - 1) + "," + (y - 8) });
      edges.push({ from: x.name, to: x.name, d: "M" + x0 + "," + (y + 8) + " L" + (stream + 8) + "," + (y + 8) });
    });
    var b = D.network.branches[net.branch], first = boxes["block." + (b.branch + 1)], last = boxes["block." + (depth - 2 - b.branch)];
    var y0 = first.y - 2, y1 = last.y + last.h + 2;
    function decorate(svg) {
      el("line", { x1: stream, x2: stream, y1: 2, y2: top + depth * rowH, stroke: C.ink, "stroke-width": 3 }, svg);
      el("text", { x: stream, y: top + depth * rowH + 14, "text-anchor": "middle", "font-size": 11, fill: C.muted }, svg, "residual stream \u2193");
      N.blocks.forEach(function (x, i) {
        var y = top + i * rowH + boxH / 2 + 8;
        el("circle", { cx: stream, cy: y, r: 6, fill: "#fff", stroke: C.ink }, svg);
        el("text", { x: stream, y: y + 4, "text-anchor": "middle", "font-size": 11, "font-weight": 700, fill: C.ink }, svg, "+");
      });
      el("rect", { x: stream - 24, y: y0, width: 10, height: y1 - y0, rx: 4, fill: C.orange, stroke: C.ink }, svg);
      el("text", { x: stream - 32, y: (y0 + y1) / 2 - 4, "text-anchor": "end", "font-size": 12, "font-weight": 700, fill: C.ink }, svg, "cached:");
      el("text", { x: stream - 32, y: (y0 + y1) / 2 + 11, "text-anchor": "end", "font-size": 11.5, fill: C.ink }, svg, "blocks " + (b.branch + 1) + "\u2013" + (depth - 2 - b.branch) + ", added once");
    }
    return { width: x0 + w + 20, height: top + depth * rowH + 22, boxes: boxes, edges: edges, decorate: decorate,
             cache: { x: stream - 19, y: (y0 + y1) / 2 - 22, hide: true } };
  }

  function networkStats(b) {
    var box = $("net-stats"), bound = D.network.mac_bound[String(b.branch)][String(net.interval)];
    clear(box);
    card(box, mega(b.shallow), "MACs of a shallow step (one sample)");
    card(box, mega(b.full), "MACs of a full step");
    card(box, pct(b.ratio), "a shallow step costs this share of a full one");
    card(box, bound === undefined ? "\u2013" : bound.toFixed(2) + "\u00d7", "mac_bound: the best speedup at interval " + net.interval);
    card(box, null, "At interval " + net.interval + ", one step in " + net.interval + " runs in full and the other " +
      (net.interval - 1) + " run only the lit blocks; counting compute alone the run can be at most " +
      (bound === undefined ? "?" : bound.toFixed(2)) + " times as fast. Shallower branches save more, but reuse a feature that is " +
      "further from the output. The reused feature is the output of " + b.cached + " (" + b.role + ").", true);
  }

  // -- 2. the timeline -----------------------------------------------------------------------------
  var tl = { interval: 3, branch: 0, forecast: 0, budget: null };

  function adaptiveRuns() { return Object.keys(D.runs).map(function (k) { return D.runs[k]; }).filter(function (r) { return r.schedule === "adaptive"; }); }

  function timelineSection() {
    $("timeline-text").textContent = "Sampling makes " + D.settings.calls + " model calls, one per step, left to right from pure noise to the image. " +
      "A uniform schedule runs every N-th step in full; the non-uniform one packs its full steps where the features change fastest; the " +
      "calibrated one picks them to minimise the measured error; the adaptive one decides per sample while sampling, refreshing when the " +
      "features stray from their forecast and staying within a budget of the uncached run's MACs.";
    var max = Math.max.apply(null, Object.keys(D.timeline.uniform).map(Number));
    $("tl-interval").max = String(max);
    var branches = unique(Object.keys(D.timeline.calibrated).map(Number).concat(adaptiveRuns().map(function (r) { return r.branch; }))).sort(function (a, b) { return a - b; });
    if (!branches.length) branches = [0];
    tl.branch = +fillSelect($("tl-branch"), branches, function (b) { return "branch " + b; });
    if (D.settings.forecasts.indexOf(2) < 0) $("tl-forecast").querySelector("option[value='2']").textContent = "forecast (order 2; no images here)";
    $("tl-interval").addEventListener("input", function () { tl.interval = +this.value; $("tl-interval-out").textContent = this.value; drawTimeline(); });
    $("tl-branch").addEventListener("change", function () { tl.branch = +this.value; refreshBudgets(); drawTimeline(); });
    $("tl-forecast").addEventListener("change", function () { tl.forecast = +this.value; drawTimeline(); });
    $("tl-budget").addEventListener("change", function () { tl.budget = this.value; drawTimeline(); });
    refreshBudgets();
    drawTimeline();
  }

  function refreshBudgets() {
    var budgets = adaptiveRuns().filter(function (r) { return r.branch === tl.branch; }).map(function (r) { return r.budget; });
    var select = $("tl-budget");
    if (!budgets.length) {
      var why = adaptiveRuns().length ? "none at this branch" : "not built for this model";
      fillSelect(select, ["none"], function () { return why; }); select.disabled = true; tl.budget = null; return;
    }
    select.disabled = false;
    tl.budget = fillSelect(select, budgets, function (b) { return pct(b) + " of MACs"; });
  }

  function drawTimeline() {
    var svg = $("tl-svg"), calls = D.settings.calls, k = String(tl.interval), rows = [];
    clear(svg);
    rows.push({ name: "uniform 1:" + k, steps: D.timeline.uniform[k] });
    rows.push({ name: "non-uniform 1:" + k, steps: D.timeline.nonuniform[k] });
    var cal = D.timeline.calibrated[String(tl.branch)];
    if (cal && cal[k]) rows.push({ name: "calibrated 1:" + k + ", branch " + tl.branch, steps: cal[k] });
    var run = tl.budget === null ? null : D.runs["adaptive|-|" + tl.branch + "|2|" + tl.budget];
    if (run) run.full_per_sample.forEach(function (steps, i) { rows.push({ name: "adaptive, sample " + (i + 1), steps: steps, adaptive: true }); });
    var labelW = 200, cell = 14, rowH = 26, width = labelW + calls * cell + 10, height = 24 + rows.length * rowH + 22;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("width", width);
    svgTitle(svg, "tl-svg", "Full and shallow steps of each schedule at interval " + k,
      rows.map(function (r) { return r.name + ": full at steps " + r.steps.join(", "); }).join("; "));
    for (var s = 0; s < calls; s += 5) el("text", { x: labelW + s * cell + cell / 2, y: 14, "font-size": 10.5, "text-anchor": "middle", fill: C.muted }, svg, String(s));
    rows.forEach(function (r, i) {
      var y = 24 + i * rowH, full = {};
      r.steps.forEach(function (s) { full[s] = true; });
      el("text", { x: labelW - 10, y: y + 15, "font-size": 12.5, "text-anchor": "end", fill: C.ink, "font-weight": r.adaptive ? 400 : 600 }, svg, r.name);
      var forecast = r.adaptive ? true : tl.forecast > 0;
      for (var c = 0; c < calls; c++) {
        var isFull = !!full[c];
        el("rect", { x: labelW + c * cell + 1, y: isFull ? y : y + 8, width: cell - 2, height: isFull ? 20 : 12, rx: 2,
                     fill: isFull ? C.blue : (forecast ? C.purple : C.orange) }, svg);
      }
      el("text", { x: labelW + calls * cell + 6, y: y + 15, "font-size": 11, fill: C.muted }, svg, "");
    });
    el("text", { x: labelW, y: height - 5, "font-size": 11, fill: C.muted }, svg, "step \u2192 (noise to image)" +
       (run ? "   adaptive rows always forecast (order " + 2 + ")" : ""));
  }

  // -- 3. the images ---------------------------------------------------------------------------------
  var ORDER = ["schedule", "branch", "interval", "forecast", "budget"];
  var pick = {}, sprites = {}, step = 0, playing = null;

  function imagesSection() {
    $("images-text").textContent = "Each sample starts from the same noise in both rows; the cached row follows the chosen schedule. " +
      "Drag the slider to watch the predicted clean image (what the network believes the final image will be) at each step. " +
      "PSNR compares the cached final images with the uncached ones (higher is closer; above about 35 dB the difference is hard to see); " +
      "the MAC fraction is the share of the uncached run's compute the cached run spent.";
    var runs = Object.keys(D.runs).map(function (k) { return D.runs[k]; });
    ORDER.forEach(function (ctrl) {
      $("img-" + ctrl).addEventListener("change", function () { pick[ctrl] = this.value; refreshImageControls(runs); });
    });
    var last = D.settings.calls - 1;
    $("img-step").max = String(last); $("img-step").value = String(last); step = last;
    $("img-step").addEventListener("input", function () { step = +this.value; drawImages(); });
    $("img-play").addEventListener("click", togglePlay);
    sprites.base = sprite(D.baseline.sprite, function () { drawImages(); });
    pick.schedule = "uniform"; pick.branch = String(D.network.branches[0].branch); pick.interval = "3";
    refreshImageControls(runs);
  }

  function labelFor(ctrl, v) {
    if (v === "null") return "\u2013";
    if (ctrl === "schedule") return SCHEDULE_NAMES[v] || v;
    if (ctrl === "interval") return "1:" + v;
    if (ctrl === "forecast") return v === "0" ? "reuse" : "forecast, order " + v;
    if (ctrl === "budget") return pct(+v) + " of MACs";
    return "branch " + v;
  }

  function refreshImageControls(runs) {  // each control offers what the grid holds given the controls before it
    var left = runs;
    ORDER.forEach(function (ctrl) {
      var values = unique(left.map(function (r) { return String(r[ctrl]); }));
      if (ctrl !== "schedule") values.sort(function (a, b) { return (+a) - (+b); });
      var select = $("img-" + ctrl);
      pick[ctrl] = fillSelect(select, values, function (v) { return labelFor(ctrl, v); }, pick[ctrl]);
      var off = values.length === 1 && values[0] === "null";
      select.disabled = off;
      select.parentNode.className = off ? "off" : "";
      left = left.filter(function (r) { return String(r[ctrl]) === pick[ctrl]; });
    });
    var run = left[0];
    if (!run) return;
    if (!sprites[run.sprite]) sprites[run.sprite] = sprite(run.sprite, function () { drawImages(); });
    pick.run = run;
    imageStats(run);
    drawImages();
  }

  function imageStats(run) {
    var box = $("img-stats"), full = run.full_per_sample.map(function (s) { return s.length; });
    clear(box);
    card(box, run.psnr === null ? "identical" : run.psnr.toFixed(1) + " dB", "PSNR of the cached images against the uncached");
    card(box, pct(run.mac_fraction), "MAC fraction: compute spent against the uncached run");
    card(box, (1 / run.mac_fraction).toFixed(2) + "\u00d7", "fewer MACs than uncached");
    var fullText = Math.min.apply(null, full) === Math.max.apply(null, full) ? String(full[0]) : Math.min.apply(null, full) + "\u2013" + Math.max.apply(null, full);
    card(box, fullText + " / " + D.settings.calls, "steps run in full" + (run.schedule === "adaptive" ? " (per sample)" : ""));
    $("img-cached-caption").textContent = "Cached: " + SCHEDULE_NAMES[run.schedule] + (run.interval !== null ? " 1:" + run.interval : "") +
      ", branch " + run.branch + (run.schedule === "adaptive" ? ", budget " + pct(run.budget) : "") +
      (run.forecast > 0 ? ", forecasting order " + run.forecast : ", reusing the cache");
  }

  function drawImages() {
    var run = pick.run;
    $("img-step-out").textContent = (step + 1) + " of " + D.settings.calls;
    drawRow($("img-base"), sprites.base, step);
    if (!run) return;
    drawRow($("img-cached"), sprites[run.sprite], step);
    $("img-base").setAttribute("aria-label", "uncached samples, predicted clean image at step " + (step + 1));
    $("img-cached").setAttribute("aria-label", "cached samples (" + $("img-cached-caption").textContent + "), predicted clean image at step " + (step + 1));
    var kinds = $("img-kinds");
    clear(kinds);
    kinds.style.gridTemplateColumns = "repeat(" + perLine() + ", 1fr)";
    kinds.style.maxWidth = $("img-cached").style.maxWidth;
    run.full_per_sample.forEach(function (steps) {
      var span = document.createElement("span"), full = steps.indexOf(step) >= 0;
      span.className = full ? "full" : (run.forecast > 0 ? "forecast" : "reuse");
      span.textContent = full ? "full" : (run.forecast > 0 ? "forecast" : "reuse");
      kinds.appendChild(span);
    });
  }

  function togglePlay() {
    var button = $("img-play");
    if (playing) { clearInterval(playing); playing = null; button.textContent = "Play"; button.setAttribute("aria-pressed", "false"); return; }
    button.textContent = "Pause"; button.setAttribute("aria-pressed", "true");
    function tick() {
      step = step >= D.settings.calls - 1 ? 0 : step + 1;
      $("img-step").value = String(step);
      drawImages();
      if (step >= D.settings.calls - 1) togglePlay();
    }
    playing = setInterval(tick, 120);
    tick();  // the first step at once, so a press always answers
  }

  // -- 4. the measurement ------------------------------------------------------------------------------
  var VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
                 [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]];
  function viridis(t) {
    t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
    var i = Math.min(Math.floor(t), VIRIDIS.length - 2), f = t - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); });
  }
  var heat = { layer: null, lo: 0, cursor: [0, 1] };
  var redrawSwitch = function () {};

  function measureSection() {
    var H = D.heatmaps;
    $("heat-text").textContent = "Each square compares a layer's output at two steps: cosine similarity, 1 meaning the same direction. " +
      "Bright bands along the diagonal mean the feature barely changes between neighbouring steps, so it can be reused. " +
      "Compare the deep layers with the shallow ones, and see the depth profile beside it: adjacent-step similarity of every layer from the input, down to the " +
      (D.network.kind === "unet" ? "bottleneck and back up." : "middle of the stack and the cached residuals.");
    var all = [];  // one colour scale for every layer, from the 5th percentile of all values (a few outliers go dark)
    H.layers.forEach(function (name) { H.matrices[name].forEach(function (row) { row.forEach(function (v) { all.push(v); }); }); });
    all.sort(function (a, b) { return a - b; });
    heat.lo = Math.min(0.9, Math.max(0, Math.floor(all[Math.floor(all.length * 0.05)] * 20) / 20));
    $("heat-lo").textContent = "\u2264 " + heat.lo.toFixed(2);
    var roles = {}; D.depth.forEach(function (r) { roles[r.layer] = r.role; });
    var cached = D.network.branches[0].cached;
    heat.layer = fillSelect($("heat-layer"), H.layers, function (n) { return n + (roles[n] ? " \u2013 " + roles[n] : ""); }, cached);
    $("heat-layer").addEventListener("change", function () { heat.layer = this.value; drawHeat(); drawDepth(); });
    var canvas = $("heat-canvas");
    function fromEvent(ev) {
      var r = canvas.getBoundingClientRect(), n = H.timesteps.length;
      var x = Math.floor((ev.clientX - r.left) / r.width * n), y = Math.floor((ev.clientY - r.top) / r.height * n);
      if (x >= 0 && y >= 0 && x < n && y < n) { heat.cursor = [y, x]; readHeat(); drawHeat(); }
    }
    canvas.addEventListener("mousemove", fromEvent);
    canvas.addEventListener("click", fromEvent);
    canvas.addEventListener("keydown", function (ev) {
      var n = H.timesteps.length, c = heat.cursor, moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
      if (!moves[ev.key]) return;
      ev.preventDefault();
      heat.cursor = [Math.max(0, Math.min(n - 1, c[0] + moves[ev.key][0])), Math.max(0, Math.min(n - 1, c[1] + moves[ev.key][1]))];
      readHeat(); drawHeat();
    });
    drawHeat(); drawDepth(); switchSection(); probeSection();
  }

  function drawHeat() {
    var H = D.heatmaps, m = H.matrices[heat.layer], n = m.length, canvas = $("heat-canvas");
    canvas.width = n; canvas.height = n;
    var ctx = canvas.getContext("2d"), image = ctx.createImageData(n, n);
    for (var i = 0; i < n; i++) for (var j = 0; j < n; j++) {
      var rgb = viridis((m[i][j] - heat.lo) / (1 - heat.lo)), o = 4 * (i * n + j);
      image.data[o] = rgb[0]; image.data[o + 1] = rgb[1]; image.data[o + 2] = rgb[2]; image.data[o + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    if (document.activeElement === canvas || heat.touched) {
      ctx.fillStyle = "rgba(213,94,0,0.95)";  // the cursor cell, vermillion
      ctx.fillRect(heat.cursor[1], heat.cursor[0], 1, 1);
    }
    canvas.setAttribute("aria-label", "similarity of " + heat.layer + " between every pair of steps; focus and use the arrow keys to read values");
  }

  function readHeat() {
    var H = D.heatmaps, i = heat.cursor[0], j = heat.cursor[1];
    heat.touched = true;
    $("heat-readout").textContent = heat.layer + ": step " + (i + 1) + " (t=" + H.timesteps[i] + ") vs step " + (j + 1) +
      " (t=" + H.timesteps[j] + "): cosine similarity " + H.matrices[heat.layer][i][j].toFixed(4);
  }

  function drawDepth() {
    var rows = D.depth, svg = $("depth-svg");
    clear(svg);
    var lo = Math.min.apply(null, rows.map(function (r) { return r.adjacent_mean; }));
    lo = Math.min(0.94, Math.max(0, Math.floor(lo * 50) / 50 - 0.02));  // keep DeepCache's 0.95 line in view
    var left = 44, bw = 22, width = left + rows.length * bw + 10, top = 14, h = 200, height = top + h + 62;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svgTitle(svg, "depth-svg", "Depth profile: adjacent-step similarity per layer",
      rows.map(function (r) { return r.layer + " " + r.adjacent_mean.toFixed(4); }).join(", "));
    function y(v) { return top + h * (1 - (v - lo) / (1 - lo)); }
    [lo, (lo + 1) / 2, 1].forEach(function (v) {
      el("line", { x1: left, x2: width - 6, y1: y(v), y2: y(v), stroke: C.line }, svg);
      el("text", { x: left - 5, y: y(v) + 4, "text-anchor": "end", "font-size": 10.5, fill: C.muted }, svg, v.toFixed(2));
    });
    if (0.95 > lo) el("line", { x1: left, x2: width - 6, y1: y(0.95), y2: y(0.95), stroke: C.vermillion, "stroke-dasharray": "5 4" }, svg);
    rows.forEach(function (r, i) {
      var x = left + i * bw + 3, on = r.layer === heat.layer;
      var bar = el("rect", { x: x, y: y(r.adjacent_mean), width: bw - 6, height: top + h - y(r.adjacent_mean),
                             fill: on ? C.orange : (r.layer === "mid" || r.layer.indexOf("cache") === 0 ? C.green : C.sky),
                             stroke: on ? C.ink : "none" }, svg);
      el("title", {}, bar, r.layer + ": mean adjacent-step similarity " + r.adjacent_mean.toFixed(4) + " (" + r.role + ")");
      el("text", { x: x + (bw - 6) / 2, y: top + h + 8, "font-size": 10, fill: on ? C.ink : C.muted, "font-weight": on ? 700 : 400,
                   transform: "rotate(60 " + (x + (bw - 6) / 2) + " " + (top + h + 8) + ")" }, svg, r.layer);
    });
    $("depth-caption").textContent = "Depth profile: mean similarity between neighbouring steps, per layer (the dashed line is DeepCache's 0.95). " +
      "The selected layer is orange; green marks " + (D.network.kind === "unet" ? "the bottleneck." : "the cached residuals.");
  }

  function switchSection() {
    var S = D["switch"];
    if (!S) {
      $("switch-text").textContent = "This model takes no class label, so the switch experiment was not run.";
      $("switch-body").hidden = true;
      return;
    }
    $("switch-text").textContent = "Sampling starts with class \u201c" + S.old + "\u201d and switches to \u201c" + S["new"] +
      "\u201d at step k. Switch early and the image follows the new class; switch late and it keeps the old one. The layout is " +
      "decided in the first steps, which is why the deep feature can be reused late in sampling.";
    var slider = $("switch-step"), img = sprite(S.sprite, function () { drawSwitch(); });
    slider.max = String(S.at.length - 1);
    slider.value = String(Math.floor(S.at.length / 2));
    slider.addEventListener("input", drawSwitch);
    redrawSwitch = drawSwitch;
    function drawSwitch() {
      var i = +slider.value, k = S.at[i], row = S.rows.filter(function (r) { return r.switch_at === k; })[0];
      $("switch-out").textContent = k + (k === 0 ? " (new class throughout)" : k >= D.settings.calls ? " (never switched)" : "");
      drawRow($("switch-canvas"), img, i);
      var reads = row && row.reads_as_new !== undefined ? "; the toy classifier reads " + pct(row.reads_as_new) + " as \u201c" + S["new"] + "\u201d" : "";
      $("switch-caption").textContent = "Final images, switched at step " + k + reads + ".";
      $("switch-canvas").setAttribute("aria-label", "final images when the class switches at step " + k + reads);
      drawSwitchChart(k);
    }
    drawSwitch();
  }

  function drawSwitchChart(current) {
    var S = D["switch"], svg = $("switch-svg");
    clear(svg);
    var rows = S.rows, left = 40, width = 420, top = 12, h = 180, height = top + h + 40, maxK = D.settings.calls;
    var cap = 60;
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svgTitle(svg, "switch-svg", "PSNR of the final images against both unswitched runs, by switch step",
      rows.map(function (r) { return "k=" + r.switch_at + ": " + r.psnr_vs_old.toFixed(1) + " dB vs old, " + r.psnr_vs_new.toFixed(1) + " dB vs new"; }).join("; "));
    function x(k) { return left + (width - left - 12) * k / maxK; }
    function y(v) { return top + h * (1 - Math.min(v, cap) / cap); }
    [0, 20, 40, 60].forEach(function (v) {
      el("line", { x1: left, x2: width - 12, y1: y(v), y2: y(v), stroke: C.line }, svg);
      el("text", { x: left - 5, y: y(v) + 4, "text-anchor": "end", "font-size": 10.5, fill: C.muted }, svg, v + (v === cap ? "+" : ""));
    });
    el("text", { x: 12, y: top + h / 2, "font-size": 10.5, fill: C.muted, transform: "rotate(-90 12 " + (top + h / 2) + ")", "text-anchor": "middle" }, svg, "PSNR (dB)");
    el("line", { x1: x(current), x2: x(current), y1: top, y2: top + h, stroke: C.ink, "stroke-dasharray": "3 3" }, svg);
    [["psnr_vs_old", C.vermillion, "circle"], ["psnr_vs_new", C.blue, "square"]].forEach(function (s) {
      el("polyline", { points: rows.map(function (r) { return x(r.switch_at) + "," + y(r[s[0]]); }).join(" "), fill: "none", stroke: s[1], "stroke-width": 2 }, svg);
      rows.forEach(function (r) {
        var cx = x(r.switch_at), cy = y(r[s[0]]);
        if (s[2] === "circle") el("circle", { cx: cx, cy: cy, r: 4, fill: s[1] }, svg);
        else el("rect", { x: cx - 4, y: cy - 4, width: 8, height: 8, fill: s[1] }, svg);
      });
    });
    for (var k = 0; k <= maxK; k += Math.max(1, Math.round(maxK / 5))) el("text", { x: x(k), y: top + h + 16, "text-anchor": "middle", "font-size": 10.5, fill: C.muted }, svg, String(k));
    el("text", { x: (left + width) / 2, y: top + h + 34, "text-anchor": "middle", "font-size": 11, fill: C.muted }, svg, "switch step k");
  }

  function probeSection() {
    var P = D.probes;
    if (!P) {
      $("probe-text").textContent = "Not measured for this page: rebuild with minidiff explain --probes 300 (a model trained on " +
        "the digits) to add them.";
      $("probe-figure").hidden = true;
      return;
    }
    $("probe-text").textContent = "A linear probe is the simplest possible classifier, trained on one layer's pooled feature to " +
      "name the digit in a real image noised to timestep t (" + P.count + " digits, half to fit, half to score). Where a probe " +
      "succeeds, that layer already holds the digit's identity at that noise level; the pixels are the control.";
    var svg = $("probe-svg"), left = 44, right = 84, top = 12, h = 200, width = 560, height = top + h + 44;
    var T = P.timesteps, colours = [C.orange, C.sky, C.green, C.blue, C.vermillion, C.purple, C.ink, "#999933"];
    var dashes = ["", "6 3", "2 3", "", "6 3", "2 3", "", "6 3"];
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svgTitle(svg, "probe-svg", "Linear-probe accuracy per layer against the timestep",
      P.layers.map(function (n) { return n + ": " + P.accuracy[n].map(function (a, i) { return "t=" + T[i] + " " + pct(a); }).join(", "); }).join("; "));
    function x(i) { return left + (width - left - right) * (T.length === 1 ? 0.5 : i / (T.length - 1)); }
    function y(a) { return top + h * (1 - a); }
    [0, 0.5, 1].forEach(function (a) {
      el("line", { x1: left, x2: width - right, y1: y(a), y2: y(a), stroke: C.line }, svg);
      el("text", { x: left - 5, y: y(a) + 4, "text-anchor": "end", "font-size": 10.5, fill: C.muted }, svg, pct(a));
    });
    el("line", { x1: left, x2: width - right, y1: y(P.chance), y2: y(P.chance), stroke: C.muted, "stroke-dasharray": "2 4" }, svg);
    el("text", { x: width - right - 4, y: y(P.chance) - 4, "text-anchor": "end", "font-size": 10, fill: C.muted }, svg, "chance");
    T.forEach(function (t, i) { el("text", { x: x(i), y: top + h + 16, "text-anchor": "middle", "font-size": 10.5, fill: C.muted }, svg, "t=" + t); });
    el("text", { x: (left + width - right) / 2, y: top + h + 34, "text-anchor": "middle", "font-size": 11, fill: C.muted }, svg,
       "timestep: pure noise \u2192 clean image");
    var ends = [];
    P.layers.forEach(function (name, k) {
      var colour = name === "pixels" ? C.muted : colours[(k - 1 + colours.length) % colours.length];
      var pts = P.accuracy[name].map(function (a, i) { return x(i) + "," + y(a); }).join(" ");
      el("polyline", { points: pts, fill: "none", stroke: colour, "stroke-width": name === "pixels" ? 1.5 : 2.2,
                       "stroke-dasharray": name === "pixels" ? "5 4" : dashes[k % dashes.length] }, svg);
      ends.push({ name: name, colour: colour, y: y(P.accuracy[name][T.length - 1]) });
    });
    ends.sort(function (a, b) { return a.y - b.y; });  // direct labels at the right end, nudged apart
    for (var i = 1; i < ends.length; i++) ends[i].y = Math.max(ends[i].y, ends[i - 1].y + 12);
    ends.forEach(function (e) { el("text", { x: width - right + 6, y: e.y + 4, "font-size": 11, fill: e.colour, "font-weight": 700 }, svg, e.name); });
    $("probe-caption").textContent = "Held-out accuracy of a linear probe on each layer (lines), from the noisiest timestep on the left to the clean image on the right.";
  }

  // -- start -------------------------------------------------------------------------------------------
  if (!D) {
    document.getElementById("lede").textContent = "The page's data (data.js) is missing; rebuild it with minidiff explain.";
    return;
  }
  header();
  networkSection();
  timelineSection();
  imagesSection();
  measureSection();
  var wasNarrow = narrow();
  window.addEventListener("resize", function () {  // the drawings change layout at phone width
    if (narrow() === wasNarrow) return;
    wasNarrow = narrow();
    drawNetwork(); drawImages(); redrawSwitch();
  });
  $("heat-canvas").addEventListener("focus", drawHeat);
  $("heat-canvas").addEventListener("blur", drawHeat);
})();
