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
const STAGE_MARGIN = 16; // pixels between the image and the stage's edge
const ZOOM_LIMITS = [1, 8];
const $ = (selector) => element.querySelector(selector);
const viewerRoot = $(".vw");
const canvas = $(".vw-canvas");
const sliceInput = $(".vw-slice");
const widthInput = $(".vw-width");
const levelInput = $(".vw-level");
const cache = new Map(); // data URL -> Promise of the codes
const view = { plane: "axial", slice: {}, width: 1500, level: -600, preset: "lung", codes: null, meta: null, url: null, zoom: 1, panX: 0, panY: 0 };

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

// The patient's other studies (same PatientID and issuer), newest first: each opens in
// this page through the worklist's ?study= link. DICOM strings are set as text.
function fillOthers(study) {
  const others = study.patient_studies || [];
  const list = $(".sv-others ul");
  list.replaceChildren();
  $(".sv-others").hidden = !others.length;
  for (const other of others) {
    const item = make("li");
    const link = make("a", "sv-other", other.date || "no date");
    link.href = "?study=" + encodeURIComponent(other.key);
    item.appendChild(link);
    item.appendChild(make("span", "badge badge-" + other.badge, other.badge_text));
    const details = [other.finding, other.description, other.reviewed ? "reviewed" : ""].filter(Boolean);
    if (details.length) item.appendChild(make("span", "sv-other-detail", details.join(" · ")));
    list.appendChild(item);
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
  const patient = $(".sv-patient");
  patient.replaceChildren();
  for (const [label, value] of study.patient || []) {
    const pair = make("div");
    pair.appendChild(make("dt", null, label));
    pair.appendChild(make("dd", null, value));
    patient.appendChild(pair);
  }
  text($(".sv-call-note"), study.call_note);
  $(".sv-call-note").hidden = !study.call_note;
  text($(".sv-call-detail"), study.call_detail);
  $(".sv-call-detail").hidden = !study.call_detail;
  const progress = $(".sv-progress");
  progress.hidden = study.fraction == null;
  progress.firstElementChild.style.width = Math.round((study.fraction || 0) * 100) + "%";
  const flags = $(".sv-flags");
  flags.replaceChildren();
  if (study.demo) flags.appendChild(make("div", "sv-flag sv-demo", "Demo weights: these probabilities mean nothing."));
  for (const flag of study.flags) flags.appendChild(make("div", "sv-flag", "data quality: " + flag));
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
  fillOthers(study);
  fillReview(study);
  showViewer(study);
}

