// The worklist: one row per study in triage order (services/frontend/worklist_rows.py),
// sortable, filterable, click to open; files dropped on it are screened. Runs as the
// js_on_load of a gr.HTML whose value is the Worklist model, after worklist_alerts.js.
// Every value is set as text (textContent), never as HTML: DICOM tags are not trusted.
const SELECTED_KEY = "cts-worklist-selected";
const root = element.querySelector(".wl");
const body = element.querySelector("tbody");
const filterBox = element.querySelector(".wl-filter");
const unreviewedBox = element.querySelector(".wl-unreviewed");
const qualityBox = element.querySelector(".wl-quality");
const summary = element.querySelector(".wl-summary");
const turnaround = element.querySelector(".wl-turnaround");
const empty = element.querySelector(".wl-empty");
const scroller = element.querySelector(".wl-scroll");
const dropHint = element.querySelector(".wl-drop");
const headers = Array.from(element.querySelectorAll("th[data-sort]"));
const state = { sortKey: "urgency", direction: 1, selected: localStorage.getItem(SELECTED_KEY), reopened: false };
// A link to one study (a webhook's "/?study=<task id>"): it opens once it is listed.
const linked = new URLSearchParams(window.location.search).get("study");
if (linked && /^[A-Za-z0-9_.-]+(:\d+)?$/.test(linked)) state.selected = linked.includes(":") ? linked : linked + ":0";
const SEARCHED = ["file", "finding", "status", "detail", "date", "description", "accession", "badge_text",
  "patient", "patient_id", "review", "call_note"];

function cell(row, className, text, title) {
  const td = document.createElement("td");
  td.className = className;
  td.textContent = text == null ? "" : String(text);
  if (title) td.title = title;
  row.appendChild(td);
  return td;
}

function line(parent, className, text) {
  const div = document.createElement("div");
  div.className = className;
  div.textContent = text == null ? "" : String(text);
  parent.appendChild(div);
  return div;
}

function compare(a, b) {
  const key = state.sortKey;
  if (key === "urgency") return state.direction * (a._order - b._order);
  const left = a[key], right = b[key];
  if (left == null || left === "") return 1;  // empty values last, either direction
  if (right == null || right === "") return -1;
  if (typeof left === "number" && typeof right === "number") return state.direction * (left - right);
  return state.direction * String(left).localeCompare(String(right), undefined, { numeric: true });
}

function visibleRows() {
  const rows = ((props.value && props.value.rows) || []).map((row, order) => ({ ...row, _order: order }));
  const words = filterBox.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const quality = qualityBox.value;
  const kept = rows.filter((row) => {
    if (unreviewedBox.checked && row.reviewed) return false;
    if (quality && !(row.quality || []).some((chip) => chip.flag === quality)) return false;
    const text = SEARCHED.map((key) => String(row[key] || "")).concat(row.flags || [],
      (row.quality || []).map((chip) => chip.text)).join(" ").toLowerCase();
    return words.every((word) => text.includes(word));
  });
  return kept.sort(compare);
}

function open(key) {
  state.selected = key;
  localStorage.setItem(SELECTED_KEY, key);
  for (const tr of body.querySelectorAll("tr")) tr.classList.toggle("selected", tr.dataset.key === key);
  trigger("study_open", { key: key });
}

function openByUser(key) {
  const view = document.getElementById("study-view");
  if (key === state.selected && view && view.dataset.shownKey === key) {
    // Open already (the reader scrolled back up): the study view comes into sight again.
    view.scrollIntoView({ behavior: "smooth", block: "start" });
    return;
  }
  document.body.dataset.ctsOpenedByUser = "1"; // the study view scrolls into sight
  open(key);
}

function whatCell(tr, row) {
  const td = cell(tr, "c-what", "", row.detail || row.status);
  const text = line(td, "wl-what", "");
  if (row.badge === "pathology" || row.badge === "normal") {
    text.textContent = row.finding || "no finding above threshold";
    if (row.status) line(text, "wl-sub", row.status);
    if (row.call_note) line(text, "wl-note", row.call_note);
  } else {
    text.textContent = row.status || "";
  }
  if (row.badge === "processing" && row.fraction != null) {
    const bar = line(td, "wl-progress", "");
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuenow", String(Math.round(row.fraction * 100)));
    line(bar, "", "").style.width = Math.round(row.fraction * 100) + "%";
  }
  for (const chip of row.quality || []) {
    const node = document.createElement("span");
    node.className = "wl-chip";
    node.dataset.flag = chip.flag;
    node.textContent = chip.text;
    node.title = "Show only the studies with: " + chip.text;
    node.addEventListener("click", (event) => {
      event.stopPropagation();
      qualityBox.value = chip.flag;
      render();
    });
    td.appendChild(node);
  }
  for (const flag of row.flags || []) line(td, "wl-flag", flag);
}

function removeButton(tr, row) {
  const remove = cell(tr, "c-remove", "");
  const button = document.createElement("button");
  button.className = "wl-remove";
  button.type = "button";
  button.textContent = "✕";
  button.title = "Remove from the worklist (the result stays stored)";
  button.setAttribute("aria-label", "Remove " + row.file + " from the worklist");
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    if (window.confirm("Remove " + row.file + " from the worklist?")) trigger("study_remove", { key: row.key });
  });
  remove.appendChild(button);
}

function drawRow(row) {
  const tr = document.createElement("tr");
  tr.dataset.key = row.key;
  tr.dataset.badge = row.badge;
  tr.className = "wl-row row-" + row.badge + (row.key === state.selected ? " selected" : "") +
    (row.reviewed ? " reviewed" : "") + (row.priority !== "routine" ? " " + row.priority : "");
  tr.tabIndex = 0;
  const status = cell(tr, "c-status", "");
  const badge = line(status, "badge badge-" + row.badge + (row.reviewed ? " reviewed" : ""), row.badge_text);
  badge.style.display = "inline-block";
  cell(tr, "c-prob", row.probability == null ? "" : row.probability.toFixed(3));
  whatCell(tr, row);
  const patient = cell(tr, "c-patient c-id", "", [row.patient, row.patient_id, row.age_sex].filter(Boolean).join(" · "));
  line(patient, "wl-line wl-strong", row.patient);
  line(patient, "wl-line wl-sub", [row.patient_id, row.age_sex].filter(Boolean).join(" · "));
  cell(tr, "c-acc c-id", row.accession, row.accession);
  const study = cell(tr, "c-study", "", row.description);
  line(study, "wl-line", row.date);
  line(study, "wl-line wl-sub", row.description);
  cell(tr, "c-time", row.received, "received " + row.received + " (" + ((props.value && props.value.time_zone) || "UTC") + ")");
  cell(tr, "c-tat", row.turnaround);
  cell(tr, "c-review", row.review, row.review);
  cell(tr, "c-file", row.file, row.file);
  removeButton(tr, row);
  tr.addEventListener("click", () => openByUser(row.key));
  tr.addEventListener("keydown", (event) => {
    if (event.key === "Enter") openByUser(row.key);
  });
  return tr;
}

function fillQualityChoices(all) {
  const present = new Map();
  for (const row of all) for (const chip of row.quality || []) present.set(chip.flag, chip.text);
  const chosen = qualityBox.value;
  const options = [["", "Any data quality"], ...Array.from(present.entries()).sort()];
  if (chosen && !present.has(chosen)) options.push([chosen, chosen.replace(/_/g, " ")]);
  const signature = JSON.stringify(options);
  if (qualityBox.dataset.options === signature) return;
  qualityBox.dataset.options = signature;
  qualityBox.replaceChildren(...options.map(([value, name]) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = name;
    return option;
  }));
  qualityBox.value = chosen;
}

function render() {
  const value = props.value || {};
  const all = value.rows || [];
  const rows = visibleRows();
  const counts = value.counts || {};
  const names = value.badges || {};
  root.classList.toggle("no-identity", !value.identity);
  const parts = Object.keys(names).filter((badge) => counts[badge]).map((badge) => counts[badge] + " " + names[badge]);
  summary.textContent = (parts.length ? parts.join(" · ") : "no studies yet") +
    (rows.length !== all.length ? "  (" + rows.length + " of " + all.length + " shown)" : "");
  turnaround.textContent = value.median_turnaround ? "median turnaround " + value.median_turnaround : "";
  turnaround.title = "received to result, median of the results of the last hour";
  fillQualityChoices(all);
  body.replaceChildren(...rows.map(drawRow));
  empty.style.display = all.length ? "none" : "block";
  for (const th of headers) {
    th.classList.toggle("sorted", th.dataset.sort === state.sortKey);
    th.dataset.direction = th.dataset.sort === state.sortKey ? (state.direction > 0 ? "▲" : "▼") : "";
  }
  noteArrivals(all);
  // After a reload: open the study that was open before, once it is listed again.
  if (!state.reopened && state.selected && all.some((row) => row.key === state.selected)) {
    state.reopened = true;
    open(state.selected);
  }
}

// Files dropped on the list go to the page's "Add studies" button, which sends them at once.
function dropped(event) {
  event.preventDefault();
  scroller.classList.remove("dragging");
  dropHint.hidden = true;
  const input = document.querySelector("#tool-bar input[type=file]");
  if (!input || !event.dataTransfer || !event.dataTransfer.files.length) return;
  const transfer = new DataTransfer();
  for (const file of event.dataTransfer.files) transfer.items.add(file);
  input.files = transfer.files;
  input.dispatchEvent(new Event("change", { bubbles: true }));
}

scroller.addEventListener("dragover", (event) => {
  if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
  event.preventDefault();
  scroller.classList.add("dragging");
  dropHint.hidden = false;
});
scroller.addEventListener("dragleave", (event) => {
  if (scroller.contains(event.relatedTarget)) return; // still over the list
  scroller.classList.remove("dragging");
  dropHint.hidden = true;
});
scroller.addEventListener("drop", dropped);
for (const th of headers) {
  th.addEventListener("click", () => {
    const key = th.dataset.sort;
    if (state.sortKey === key) state.direction = -state.direction;
    else {
      state.sortKey = key;
      // Urgency and probability read best most-urgent first, the rest ascending.
      state.direction = key === "probability" || key === "received_ts" ? -1 : 1;
    }
    render();
  });
}
// The list ends at the window's bottom edge whatever the bars above it hold (banners come and go).
function fitHeight() {
  const top = scroller.getBoundingClientRect().top + window.scrollY;
  scroller.style.height = Math.max(260, window.innerHeight - top - 10) + "px";
}
window.addEventListener("resize", fitHeight);
new ResizeObserver(fitHeight).observe(document.body);
filterBox.addEventListener("input", render);
unreviewedBox.addEventListener("change", render);
qualityBox.addEventListener("change", render);
render();
watch("value", render);
