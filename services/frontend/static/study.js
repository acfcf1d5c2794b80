// The study view and its slice viewer. Runs as the js_on_load of a gr.HTML whose value is the
// study's plain data (services/frontend/study_view.py). Every value is set as text.
//
// Viewer data (services/adapter/viewer_data.py): zlib-compressed uint8 codes, shape
// [slices, rows, columns] in the display frame (superior->inferior, anterior->posterior,
// patient right->left), and codes_hu, the HU of each code. The window is applied here through
// a 256-entry table, so presets and free window/level redraw without loading anything.
const PRESETS = {
  lung: { width: 1500, level: -600 },
  mediastinum: { width: 350, level: 40 },
  bone: { width: 2000, level: 500 },
  brain: { width: 80, level: 40 },
};
// Edge letters and the array axes of each plane: [rows axis, columns axis, slice axis].
const PLANES = {
  axial: { axes: [1, 2, 0], marks: ["A", "P", "R", "L"] },
  coronal: { axes: [0, 2, 1], marks: ["S", "I", "R", "L"] },
  sagittal: { axes: [0, 1, 2], marks: ["S", "I", "A", "P"] },
};
const STAGE_PIXELS = 440;
const $ = (selector) => element.querySelector(selector);
const viewerRoot = $(".vw");
const canvas = $(".vw-canvas");
const sliceInput = $(".vw-slice");
const widthInput = $(".vw-width");
const levelInput = $(".vw-level");
const cache = new Map(); // data URL -> Promise of the codes
const view = { plane: "axial", slice: {}, width: 1500, level: -600, preset: "lung", codes: null, meta: null, url: null };

function text(node, value) {
  node.textContent = value == null ? "" : String(value);
  return node;
}

function make(tag, className, value) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (value != null) node.textContent = String(value);
  return node;
}

function table(node, rows) {
  node.replaceChildren();
  for (const [label, value] of rows) {
    const tr = make("tr");
    tr.appendChild(make("th", null, label));
    tr.appendChild(make("td", null, value));
    node.appendChild(tr);
  }
}

// -- the panel ---------------------------------------------------------------------------

function findingRow(finding) {
  const tr = make("tr", finding.positive ? "positive" : "");
  tr.appendChild(make("th", null, finding.label));
  const td = make("td");
  const bar = make("span", "sv-bar");
  const fill = make("span");
  fill.style.width = Math.round(finding.probability * 100) + "%";
  bar.appendChild(fill);
  td.appendChild(bar);
  td.appendChild(make("span", "sv-number", finding.probability.toFixed(2)));
  td.appendChild(make("span", "sv-threshold", "threshold " + finding.threshold.toFixed(2)));
  tr.appendChild(td);
  return tr;
}

function fillFindings(study) {
  const positive = study.findings.filter((finding) => finding.positive);
  const negative = study.findings.filter((finding) => !finding.positive);
  $(".sv-findings").hidden = !study.findings.length;
  const above = $(".sv-positive");
  above.replaceChildren(...positive.map(findingRow));
  if (!positive.length) {
    const tr = make("tr");
    tr.appendChild(make("td", "sv-none", "none"));
    above.appendChild(tr);
  }
  $(".sv-negative").replaceChildren(...negative.map(findingRow));
  $(".sv-below").hidden = !negative.length;
  text($(".sv-below summary"), negative.length + " finding(s) below threshold");
}

function fillWarnings(study) {
  const list = $(".sv-warnings ul");
  list.replaceChildren();
  for (const note of study.notes) list.appendChild(make("li", "sv-note", note));
  for (const warning of study.warnings) {
    const item = make("li");
    if (warning.detail) {
      const details = make("details");
      details.appendChild(make("summary", null, warning.headline));
      details.appendChild(make("div", "sv-detail", warning.detail));
      item.appendChild(details);
    } else {
      text(item, warning.headline);
    }
    list.appendChild(item);
  }
  if (!study.notes.length && !study.warnings.length) list.appendChild(make("li", "sv-none", "none"));
}

function fillChestCheck(study) {
  const section = $(".sv-chest");
  const node = $(".sv-chest div");
  node.replaceChildren();
  section.hidden = !study.chest_check;
  if (!study.chest_check) return;
  const check = study.chest_check;
  node.appendChild(make("p", "sv-verdict", check.verdict.headline));
  if (check.verdict.detail) node.appendChild(make("p", "sv-detail", check.verdict.detail));
  const list = make("ul");
  for (const line of check.lines) list.appendChild(make("li", null, line));
  node.appendChild(list);
  const details = make("details");
  details.appendChild(make("summary", null, "The numbers and the tags"));
  const numbers = make("table");
  table(numbers, check.numbers.concat(check.tags.map((tag) => ["tag", tag])));
  details.appendChild(numbers);
  node.appendChild(details);
}

function fillFiles(study) {
  const previews = $(".sv-previews");
  previews.replaceChildren();
  $(".sv-model-input").hidden = !study.previews.length;
  for (const preview of study.previews) {
    const figure = make("figure");
    const image = make("img");
    image.src = preview.url;
    image.alt = preview.caption;
    figure.appendChild(image);
    figure.appendChild(make("figcaption", null, preview.caption));
    previews.appendChild(figure);
  }
  const files = $(".sv-files div");
  files.replaceChildren();
  $(".sv-files").hidden = !study.downloads.length;
  for (const file of study.downloads) {
    const link = make("a", "sv-download", file.kind === "xlsx" ? "Report table (xlsx)" : "Warnings and errors (txt)");
    link.href = file.url;
    link.setAttribute("download", file.name);
    files.appendChild(link);
  }
}

function fill() {
  const study = props.value;
  $(".sv-empty").hidden = !!study;
  $(".sv-body").hidden = !study;
  if (!study) return;
  element.dataset.key = study.key;
  const badge = $(".sv-badge");
  badge.className = "badge sv-badge badge-" + study.badge;
  text(badge, study.badge_text);
  text($(".sv-title"), study.title);
  text($(".sv-call"), study.call);
  $(".sv-call").className = "sv-call call-" + study.badge;
  text($(".sv-call-detail"), study.call_detail);
  $(".sv-call-detail").hidden = !study.call_detail;
  const progress = $(".sv-progress");
  progress.hidden = study.fraction == null;
  progress.firstElementChild.style.width = Math.round((study.fraction || 0) * 100) + "%";
  const flags = $(".sv-flags");
  flags.replaceChildren();
  if (study.demo) flags.appendChild(make("div", "sv-flag sv-demo", "Demo weights: these probabilities mean nothing."));
  for (const flag of study.flags) flags.appendChild(make("div", "sv-flag", flag));
  fillFindings(study);
  fillWarnings(study);
  fillChestCheck(study);
  table($(".sv-quality table"), study.quality);
  const series = $(".sv-series");
  series.replaceChildren();
  for (const decision of study.series) {
    series.appendChild(make("li", decision.selected ? "selected" : "", (decision.selected ? "✔ " : "✘ ") + decision.text + ": " + decision.reason));
  }
  $(".sv-quality").hidden = !study.quality.length && !study.series.length;
  table($(".sv-identity table"), study.identity);
  fillFiles(study);
  showViewer(study);
}

// -- the viewer ---------------------------------------------------------------------------

async function loadCodes(url) {
  if (!cache.has(url)) {
    cache.set(url, (async () => {
      const response = await fetch(url, { credentials: "same-origin" });
      if (!response.ok) throw new Error("the viewer data did not load (HTTP " + response.status + ")");
      const inflated = response.body.pipeThrough(new DecompressionStream("deflate"));
      return new Uint8Array(await new Response(inflated).arrayBuffer());
    })());
  }
  return cache.get(url);
}

function message(value) {
  const node = $(".vw-message");
  text(node, value);
  node.hidden = !value;
}

async function showViewer(study) {
  const data = study.viewer;
  viewerRoot.classList.toggle("vw-none", !data);
  if (!data) {
    viewerRoot.dataset.ready = "0";
    view.codes = null;
    view.meta = null;
    view.url = null;
    canvas.hidden = true;
    message(study.viewer_missing || "No images to show.");
    return;
  }
  if (view.url === data.url && view.codes) return; // the same study, refreshed
  view.url = data.url;
  view.meta = data;
  view.codes = null;
  view.slice = {};
  canvas.hidden = true;
  message("Loading the images…");
  viewerRoot.dataset.ready = "0";
  try {
    const codes = await loadCodes(data.url);
    if (view.url !== data.url) return; // another study was opened meanwhile
    const [slices, rows, columns] = data.shape;
    if (codes.length !== slices * rows * columns) throw new Error("the viewer data has the wrong size");
    view.codes = codes;
    message("");
    canvas.hidden = false;
    setPlane(view.plane);
    viewerRoot.dataset.ready = "1";
  } catch (error) {
    message(String(error.message || error));
  }
}

function planeSize(plane) {
  const [rowsAxis, columnsAxis, sliceAxis] = PLANES[plane].axes;
  const shape = view.meta.shape;
  return { rows: shape[rowsAxis], columns: shape[columnsAxis], slices: shape[sliceAxis] };
}

function setPlane(plane) {
  view.plane = plane;
  const size = planeSize(plane);
  if (view.slice[plane] == null) view.slice[plane] = Math.floor(size.slices / 2);
  sliceInput.max = String(size.slices - 1);
  sliceInput.value = String(view.slice[plane]);
  for (const button of element.querySelectorAll("[data-plane]")) button.classList.toggle("active", button.dataset.plane === plane);
  const marks = PLANES[plane].marks;
  for (const [index, name] of ["top", "bottom", "left", "right"].entries()) text($(".vw-" + name), marks[index]);
  draw();
}

function setSlice(index) {
  if (!view.codes) return;
  const size = planeSize(view.plane);
  view.slice[view.plane] = Math.max(0, Math.min(size.slices - 1, index));
  sliceInput.value = String(view.slice[view.plane]);
  draw();
}

function setWindow(width, level, preset) {
  view.width = Math.max(1, Math.round(width));
  view.level = Math.round(level);
  view.preset = preset || "";
  widthInput.value = String(view.width);
  levelInput.value = String(view.level);
  for (const button of element.querySelectorAll("[data-preset]")) button.classList.toggle("active", button.dataset.preset === view.preset);
  draw();
}

function draw() {
  viewerRoot.dataset.plane = view.plane;
  viewerRoot.dataset.width = String(view.width);
  viewerRoot.dataset.level = String(view.level);
  if (!view.codes) return;
  const meta = view.meta;
  const [, rows, columns] = meta.shape;
  const plane = view.plane;
  const size = planeSize(plane);
  const index = view.slice[plane];
  viewerRoot.dataset.slice = String(index);
  const low = view.level - view.width / 2;
  const lut = new Uint8ClampedArray(256);
  for (let code = 0; code < 256; code++) lut[code] = ((meta.codes_hu[code] - low) / view.width) * 255;
  canvas.width = size.columns;
  canvas.height = size.rows;
  const context = canvas.getContext("2d");
  const image = context.createImageData(size.columns, size.rows);
  const pixels = image.data;
  const codes = view.codes;
  const planeStride = rows * columns;
  let out = 0;
  for (let r = 0; r < size.rows; r++) {
    for (let c = 0; c < size.columns; c++) {
      let offset;
      if (plane === "axial") offset = index * planeStride + r * columns + c;
      else if (plane === "coronal") offset = r * planeStride + index * columns + c;
      else offset = r * planeStride + c * columns + index;
      const grey = lut[codes[offset]];
      pixels[out] = grey;
      pixels[out + 1] = grey;
      pixels[out + 2] = grey;
      pixels[out + 3] = 255;
      out += 4;
    }
  }
  context.putImageData(image, 0, 0);
  // Shown in millimetres: a coronal plane of 3 mm slabs is not squashed.
  const [rowsAxis, columnsAxis] = PLANES[plane].axes;
  const heightMm = size.rows * meta.spacing_mm[rowsAxis];
  const widthMm = size.columns * meta.spacing_mm[columnsAxis];
  const scale = STAGE_PIXELS / Math.max(heightMm, widthMm);
  canvas.style.width = Math.round(widthMm * scale) + "px";
  canvas.style.height = Math.round(heightMm * scale) + "px";
  const name = plane.charAt(0).toUpperCase() + plane.slice(1);
  text($(".vw-info"), name + " " + (index + 1) + "/" + size.slices + " · W " + view.width + " L " + view.level);
}

for (const button of element.querySelectorAll("[data-plane]")) {
  button.addEventListener("click", () => view.codes && setPlane(button.dataset.plane));
}
for (const button of element.querySelectorAll("[data-preset]")) {
  button.addEventListener("click", () => {
    const preset = PRESETS[button.dataset.preset];
    setWindow(preset.width, preset.level, button.dataset.preset);
  });
}
sliceInput.addEventListener("input", () => setSlice(Number(sliceInput.value)));
widthInput.addEventListener("input", () => setWindow(Number(widthInput.value), view.level, ""));
levelInput.addEventListener("input", () => setWindow(view.width, Number(levelInput.value), ""));
const stage = $(".vw-stage");
stage.tabIndex = 0;
stage.addEventListener("wheel", (event) => {
  if (!view.codes) return;
  event.preventDefault();
  setSlice(view.slice[view.plane] + (event.deltaY > 0 ? 1 : -1));
}, { passive: false });
stage.addEventListener("keydown", (event) => {
  const steps = { ArrowDown: 1, ArrowUp: -1, PageDown: 10, PageUp: -10 };
  if (view.codes && event.key in steps) {
    event.preventDefault();
    setSlice(view.slice[view.plane] + steps[event.key]);
  }
});
let drag = null;
stage.addEventListener("contextmenu", (event) => event.preventDefault());
stage.addEventListener("mousedown", (event) => {
  if (event.button === 2) drag = { x: event.clientX, y: event.clientY, width: view.width, level: view.level };
});
window.addEventListener("mousemove", (event) => {
  if (drag) setWindow(drag.width + (event.clientX - drag.x) * 4, drag.level + (event.clientY - drag.y) * 2, "");
});
window.addEventListener("mouseup", () => { drag = null; });
$(".sv-back").addEventListener("click", () => {
  const list = document.getElementById("worklist");
  if (list) list.scrollIntoView({ behavior: "smooth", block: "start" });
});

setWindow(PRESETS.lung.width, PRESETS.lung.level, "lung");
fill();
watch("value", () => {
  fill();
  // A study the user opened comes into view; a refresh, or the study reopened after a page
  // reload, leaves the page where it is (the worklist stays above the fold).
  if (props.value && element.dataset.shown !== props.value.key) {
    element.dataset.shown = props.value.key;
    if (document.body.dataset.ctsOpenedByUser === "1") {
      element.scrollIntoView({ behavior: "smooth", block: "start" });
    }
  }
  delete document.body.dataset.ctsOpenedByUser;
});
