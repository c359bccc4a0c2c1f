"""The live view's one page: self-contained (no CDN, works offline), polls /api/status once a second and shows every
camera's live overlay, counters, NG rate against the calibrated false-alarm rate, FPS, latency and last NG parts."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipad-edge station</title>
<style>
 body{font:14px system-ui,sans-serif;margin:0;background:#111;color:#eee}
 header{padding:8px 14px;background:#222;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
 header h1{font-size:18px;margin:0} .muted{color:#999}
 #warnings{margin:8px 14px;color:#fc6} #warnings div{margin:2px 0}
 main{display:flex;flex-wrap:wrap;gap:12px;padding:12px}
 .cam{background:#1c1c1c;border:1px solid #333;border-radius:6px;padding:10px;width:min(100%,560px)}
 .cam h2{font-size:16px;margin:0 0 6px} .live{width:100%;background:#000;min-height:120px;display:block}
 .row{display:flex;gap:14px;flex-wrap:wrap;margin:6px 0} .big{font-size:22px;font-weight:600}
 .ok{color:#5d5} .ng{color:#f55} .stalled{border-color:#f55}
 .thumbs{display:flex;gap:6px;flex-wrap:wrap} .thumbs figure{margin:0;width:100px;font-size:11px}
 .thumbs img{width:100px;display:block}
 form{display:inline}
</style></head>
<body>
<header><h1>clipad-edge station</h1><span id="model" class="muted"></span><span id="run" class="muted"></span>
<span id="updated" class="muted"></span></header>
<div id="warnings"></div>
<main id="cameras"></main>
<pre id="status-json" hidden></pre>
<script>
const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
const headers = token ? {"Authorization": "Bearer " + token} : {};
const built = {};
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function set(id, text) { const e = document.getElementById(id); if (e) e.textContent = text; }
function fmt(v, digits) { return v === null || v === undefined ? "–" : Number(v).toFixed(digits); }
function build(name, classes) {
  const card = el("section", {class: "cam", id: "cam-" + name});
  card.append(el("h2", {}, name));
  const img = el("img", {class: "live", alt: "live view of " + name, id: "live-" + name});
  card.append(img);
  const counts = el("div", {class: "row"});
  for (const [key, label, cls] of [["ok", "OK", "ok"], ["ng", "NG", "ng"], ["errors", "errors", ""],
                                   ["frames", "frames", ""]]) {
    const box = el("div");
    box.append(el("div", {class: "big " + cls, id: key + "-" + name}, "0"), el("div", {class: "muted"}, label));
    counts.append(box);
  }
  card.append(counts);
  const info = el("div", {class: "row muted"});
  info.append(el("span", {id: "rate-" + name}), el("span", {id: "fps-" + name}), el("span", {id: "lat-" + name}));
  card.append(info);
  const cls = el("div", {class: "row"});
  const select = el("select", {id: "class-" + name});
  for (const c of classes) select.append(el("option", {value: c}, c));
  select.addEventListener("change", () => fetch("/api/cameras/" + name + "/class" + q, {method: "POST",
    headers: Object.assign({"Content-Type": "application/json"}, headers),
    body: JSON.stringify({class_name: select.value})}));
  cls.append(el("span", {class: "muted"}, "class "), select, el("span", {class: "muted", id: "source-" + name}));
  card.append(cls);
  card.append(el("div", {class: "muted"}, "last NG parts"), el("div", {class: "thumbs", id: "thumbs-" + name}));
  document.getElementById("cameras").append(card);
  built[name] = {thumbs: ""};
  img.src = "/stream/" + encodeURIComponent(name) + ".mjpg" + q;   // after the page is built: no blocked load
}
async function poll() {
  try {
    const r = await fetch("/api/status" + q, {headers});
    if (!r.ok) { set("updated", "status: HTTP " + r.status); return; }
    const s = await r.json();
    set("model", s.model.kind + " " + s.model.arch + " · " + s.model.backend + " · " + s.model.precision);
    set("run", "run " + s.run);
    set("updated", "updated " + s.time.slice(11, 19) + " UTC");
    for (const [name, c] of Object.entries(s.cameras)) {
      if (!built[name]) build(name, s.model.class_names);
      for (const key of ["ok", "ng", "errors", "frames"]) set(key + "-" + name, c[key]);
      set("rate-" + name, "NG rate " + fmt(100 * c.ng_rate, 1) + " % (calibrated " +
          (c.target_fpr === null ? "–" : fmt(100 * c.target_fpr, 1) + " %") + ")");
      set("fps-" + name, fmt(c.fps, 1) + " FPS");
      set("lat-" + name, "latency p50 " + fmt(c.latency_ms.p50, 0) + " / p99 " + fmt(c.latency_ms.p99, 0) + " ms");
      set("source-" + name, " " + c.source + (c.lost ? " · LOST: " + c.lost : ""));
      const select = document.getElementById("class-" + name);
      if (select && document.activeElement !== select) select.value = c.class_name;
      document.getElementById("cam-" + name).classList.toggle("stalled", c.stalled);
      const key = c.last_ng.map(t => t.seq).join(",");
      if (key !== built[name].thumbs) {
        built[name].thumbs = key;
        const box = document.getElementById("thumbs-" + name);
        box.replaceChildren(...c.last_ng.slice().reverse().map(t => {
          const f = el("figure");
          f.append(el("img", {src: "/api/thumb/" + name + "/" + t.seq + ".jpg" + q, alt: "NG " + t.seq}),
                   el("figcaption", {}, "#" + t.seq + " " + fmt(t.score, 4) + " · " + t.regions + " region(s)"));
          return f;
        }));
      }
    }
    const w = document.getElementById("warnings");
    w.replaceChildren(...s.warnings.map(x => el("div", {}, "⚠ " + (x.camera ? x.camera + ": " : "") + x.kind +
                                                          " — " + x.detail)));
    document.getElementById("status-json").textContent = JSON.stringify(s);
  } catch (e) { set("updated", "status unreachable"); }
}
poll(); setInterval(poll, 1000);
</script></body></html>
"""
