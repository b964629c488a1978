// medunifier co-pilot page: plain JS against the REST API of the same origin (no external resources).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, info: null };

function token() { return sessionStorage.getItem("medunifier-token") || ""; }

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", "Bearer " + token());
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    if (response.status === 401) $("token-form").hidden = false;
    const message = body && body.error ? body.error.message : response.status + " " + response.statusText;
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return body;
}

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); }

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------------------------------ model info

async function loadInfo() {
  try {
    const info = await api("/v1/model");
    state.info = info;
    const parts = [`medunifier ${info.version}`, `image ${info.image.size}px`,
      info.checksum ? `weights ${info.checksum.slice(7, 19)}` : "unsaved weights",
      info.index ? `${info.index.count} indexed cases` : "no case index",
      info.generation.available ? "generation on" : "generation off"];
    $("model-info").textContent = parts.join(" · ");
    const select = $("edit-finding");
    clear(select);
    for (const label of info.labels) select.appendChild(el("option", { value: label }, label.replace(/_/g, " ")));
    if (!info.index) $("similar-note").textContent = "This server has no case index (start it with --index).";
    if (!info.generation.available) {
      const why = "Image generation is not available: " + (info.generation.reason || "no generator");
      setStatus("synth-status", why);
      setStatus("edit-status", why);
    }
  } catch (err) {
    setStatus("status", "Model information: " + err.message, true);
  }
}

// ------------------------------------------------------------------------------------------- reading

function formWithImage(file, fields = {}) {
  const form = new FormData();
  form.append("image", file, file.name);
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  return form;
}

function showBars(result) {
  const box = $("findings");
  clear(box);
  const entries = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of entries) {
    box.appendChild(el("span", { class: "bar-label" }, label.replace(/_/g, " ")));
    const track = el("div", { class: "bar-track", role: "img", "aria-label": `${label} ${(100 * p).toFixed(1)}%` });
    const fill = el("div", { class: "bar-fill" });
    fill.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(fill);
    box.appendChild(track);
    box.appendChild(el("span", { class: "bar-value" }, (100 * p).toFixed(1) + "%"));
  }
}

function showCases(hits) {
  const list = $("similar");
  clear(list);
  for (const hit of hits) {
    const item = el("li");
    const img = el("img", { alt: hit.id });
    if (hit.thumbnail) img.src = hit.thumbnail;
    item.appendChild(img);
    const body = el("div");
    const positives = Object.entries(hit.labels).filter(([, v]) => v === 1).map(([k]) => k.replace(/_/g, " "));
    body.appendChild(el("div", { class: "meta" },
      `#${hit.rank} · ${hit.id} · similarity ${hit.score.toFixed(3)}` + (positives.length ? " · " + positives.join(", ") : "")));
    body.appendChild(el("div", {}, hit.text));
    item.appendChild(body);
    list.appendChild(item);
  }
}

async function readImage(file) {
  state.file = file;
  const report = $("report-text");
  report.dataset.state = "loading";
  report.textContent = "…";
  clear($("findings"));
  clear($("similar"));
  setStatus("status", `Reading ${file.name}…`);
  try {
    const rep = await api("/v1/report", { method: "POST", body: formWithImage(file, { preview: "true" }) });
    const item = rep.reports[0];
    report.textContent = item.report || "(empty draft)";
    report.dataset.state = "done";
    if (item.preview) {
      $("preview").src = item.preview;
      $("preview-name").textContent = file.name;
      $("preview-box").hidden = false;
    }
    setStatus("status", "Draft report ready; scoring findings…");
    const cls = await api("/v1/classify", { method: "POST", body: formWithImage(file) });
    showBars(cls.results[0]);
    if (state.info && state.info.index) {
      const ret = await api("/v1/retrieve", { method: "POST", body: formWithImage(file, { k: "5" }) });
      showCases(ret.hits);
    }
    setStatus("status", `Done: ${file.name}`);
  } catch (err) {
    report.dataset.state = "error";
    if (report.textContent === "…") report.textContent = "";
    setStatus("status", err.message, true);
  }
}

// ------------------------------------------------------------------------------------------ generating

async function synthesize(event) {
  event.preventDefault();
  const text = $("synth-text").value.trim();
  if (!text) { setStatus("synth-status", "Type a description first.", true); return; }
  const body = { text, n: Number($("synth-n").value), guidance: Number($("synth-guidance").value),
    steps: Number($("synth-steps").value) };
  if ($("synth-seed").value !== "") body.seed = Number($("synth-seed").value);
  setStatus("synth-status", "Synthesizing…");
  const box = $("synth-images");
  clear(box);
  try {
    const res = await api("/v1/synthesize", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    for (const im of res.images) {
      const fig = el("figure");
      fig.appendChild(el("img", { src: im.image, alt: "synthetic image" }));
      fig.appendChild(el("span", { class: "badge" }, "SYNTHETIC"));
      fig.appendChild(el("figcaption", {}, `seed ${im.seed}`));
      box.appendChild(fig);
    }
    setStatus("synth-status", res.notice);
  } catch (err) {
    setStatus("synth-status", err.message, true);
  }
}

async function editImage(event) {
  event.preventDefault();
  if (!state.file) { setStatus("edit-status", "Upload an image in section 1 first.", true); return; }
  const custom = $("edit-text").value.trim();
  const finding = $("edit-finding").value;
  const text = custom || (finding ? finding.replace(/_/g, " ") : "");
  if (!text) { setStatus("edit-status", "Pick a finding or type a description.", true); return; }
  setStatus("edit-status", "Editing…");
  try {
    const res = await api("/v1/edit", { method: "POST",
      body: formWithImage(state.file, { text, strength: $("edit-strength").value }) });
    $("edit-source").src = res.source;
    $("edit-edited").src = res.edited;
    $("edit-diff").src = res.difference;
    $("edit-diff-caption").textContent =
      `|edited − reconstruction|: mean ${res.mean_abs_difference.toFixed(3)}, max ${res.max_abs_difference.toFixed(3)}`;
    $("edit-result").hidden = false;
    setStatus("edit-status", res.notice);
  } catch (err) {
    setStatus("edit-status", err.message, true);
  }
}

async function imageToImage(event) {
  event.preventDefault();
  if (!state.file) { setStatus("i2i-status", "Upload an image in section 1 first.", true); return; }
  const [task, value] = $("i2i-op").value.split(":");
  const field = { translate: "to", upscale: "scale", segment: "finding" }[task];
  setStatus("i2i-status", "Running…");
  $("i2i-result").hidden = true;
  try {
    const res = await api("/v1/" + task, { method: "POST", body: formWithImage(state.file, { [field]: value }) });
    $("i2i-source").src = res.source;
    $("i2i-output").src = res.mask || res.image;
    $("i2i-caption").textContent = res.mask
      ? `${res.instruction}: ${(100 * res.area_fraction).toFixed(1)}% of the image` : res.instruction;
    $("i2i-result").hidden = false;
    setStatus("i2i-status", res.notice);
  } catch (err) {
    setStatus("i2i-status", err.message, true);
  }
}

// --------------------------------------------------------------------------------------------- wiring

function init() {
  const input = $("file-input");
  input.addEventListener("change", () => { if (input.files.length) readImage(input.files[0]); });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) readImage(e.dataTransfer.files[0]);
  });
  $("synth-form").addEventListener("submit", synthesize);
  $("edit-form").addEventListener("submit", editImage);
  $("i2i-form").addEventListener("submit", imageToImage);
  $("edit-strength").addEventListener("input", (e) => { $("edit-strength-value").textContent = Number(e.target.value).toFixed(2); });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("medunifier-token", $("token-input").value.trim());
    $("token-form").hidden = true;
    loadInfo();
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
