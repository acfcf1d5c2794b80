// The worklist: one row per study, sortable (urgency first), filterable, click to open.
// Runs as the js_on_load of a gr.HTML whose value is {rows, counts} (services/frontend/views.py).
// Every value is set as text (textContent), never as HTML: DICOM tags are not trusted.
const SELECTED_KEY = "cts-worklist-selected";
const body = element.querySelector("tbody");
const filterBox = element.querySelector(".wl-filter");
const summary = element.querySelector(".wl-summary");
const empty = element.querySelector(".wl-empty");
const headers = Array.from(element.querySelectorAll("th[data-sort]"));
const state = { sortKey: "urgency", direction: 1, selected: localStorage.getItem(SELECTED_KEY), reopened: false };
const SEARCHED = ["file", "finding", "status", "detail", "date", "description", "accession", "badge_text"];

function cell(row, className, text, title) {
  const td = document.createElement("td");
  td.className = className;
  td.textContent = text == null ? "" : String(text);
  if (title) td.title = title;
  row.appendChild(td);
  return td;
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
  const kept = rows.filter((row) => {
    const text = SEARCHED.map((key) => String(row[key] || "")).concat(row.flags || []).join(" ").toLowerCase();
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
  document.body.dataset.ctsOpenedByUser = "1"; // the study view scrolls into sight
  open(key);
}

function whatCell(tr, row) {
  const td = cell(tr, "c-what", "", row.detail || row.status);
  const text = document.createElement("div");
  text.className = "wl-what";
  if (row.badge === "pathology" || row.badge === "normal") {
    text.textContent = row.finding || "no finding above threshold";
    if (row.status) {
      const more = document.createElement("div");
      more.className = "wl-sub";
      more.textContent = row.status;
      text.appendChild(more);
    }
  } else {
    text.textContent = row.status || "";
  }
  td.appendChild(text);
  if (row.badge === "processing" && row.fraction != null) {
    const bar = document.createElement("div");
    bar.className = "wl-progress";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuenow", String(Math.round(row.fraction * 100)));
    const fill = document.createElement("div");
    fill.style.width = Math.round(row.fraction * 100) + "%";
    bar.appendChild(fill);
    td.appendChild(bar);
  }
  for (const flag of row.flags || []) {
    const chip = document.createElement("div");
    chip.className = "wl-flag";
    chip.textContent = flag;
    td.appendChild(chip);
  }
}

function render() {
  const rows = visibleRows();
  const all = (props.value && props.value.rows) || [];
  const counts = (props.value && props.value.counts) || {};
  const names = (props.value && props.value.badges) || {};
  const parts = Object.keys(names).filter((badge) => counts[badge]).map((badge) => counts[badge] + " " + names[badge]);
  summary.textContent = (parts.length ? parts.join(" · ") : "no studies yet") +
    (rows.length !== all.length ? "  (" + rows.length + " of " + all.length + " shown)" : "");
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    tr.dataset.key = row.key;
    tr.dataset.badge = row.badge;
    tr.className = "wl-row row-" + row.badge + (row.key === state.selected ? " selected" : "");
    tr.tabIndex = 0;
    const status = cell(tr, "c-status", "");
    const badge = document.createElement("span");
    badge.className = "badge badge-" + row.badge;
    badge.textContent = row.badge_text;
    status.appendChild(badge);
    cell(tr, "c-prob", row.probability == null ? "" : row.probability.toFixed(3));
    whatCell(tr, row);
    cell(tr, "c-date", row.date);
    cell(tr, "c-desc", row.description, row.description);
    cell(tr, "c-acc", row.accession);
    cell(tr, "c-file", row.file, row.file);
    cell(tr, "c-time", row.submitted);
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
    tr.addEventListener("click", () => openByUser(row.key));
    tr.addEventListener("keydown", (event) => {
      if (event.key === "Enter") openByUser(row.key);
    });
    body.appendChild(tr);
  }
  empty.style.display = all.length ? "none" : "block";
  for (const th of headers) {
    th.classList.toggle("sorted", th.dataset.sort === state.sortKey);
    th.dataset.direction = th.dataset.sort === state.sortKey ? (state.direction > 0 ? "▲" : "▼") : "";
  }
  // After a reload: open the study that was open before, once it is listed again.
  if (!state.reopened && state.selected && all.some((row) => row.key === state.selected)) {
    state.reopened = true;
    open(state.selected);
  }
}

for (const th of headers) {
  th.addEventListener("click", () => {
    const key = th.dataset.sort;
    if (state.sortKey === key) state.direction = -state.direction;
    else {
      state.sortKey = key;
      // Urgency and probability read best most-urgent first, the rest ascending.
      state.direction = key === "probability" || key === "submitted_ts" ? -1 : 1;
    }
    render();
  });
}
filterBox.addEventListener("input", render);
render();
watch("value", render);
