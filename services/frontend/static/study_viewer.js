// -- the viewer ---------------------------------------------------------------------------
// Wheel, slider or arrow keys: slices; Ctrl+wheel: zoom; left-drag: pan; double-click: fit;
// right-drag: window/level. Positions are in millimetres from the first voxel of the series
// as shown (head end, anterior, patient right). Slices the adapter filled by interpolation
// (viewer data "interpolated_slices" along "interpolated_axis" of the display array) are
// marked: a red label and slider ticks in the plane that cuts them, red edges on the rows or
// columns they make in the other planes.
const stage = $(".vw-stage");
const sliceMarks = $(".vw-slice-marks");

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

function interpolated() {
  return new Set((view.meta && view.meta.interpolated_slices) || []);
}

function interpolatedAxis() {
  return (view.meta && view.meta.interpolated_axis) || 0;
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
  // Each study opens as the last one did not leave it: lung window, whole image.
  view.zoom = 1;
  view.panX = 0;
  view.panY = 0;
  setWindow(PRESETS.lung.width, PRESETS.lung.level, "lung");
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

function drawSliceMarks() {
  sliceMarks.replaceChildren();
  const marked = PLANES[view.plane].axes[2] === interpolatedAxis() ? Array.from(interpolated()) : [];
  const slices = planeSize(view.plane).slices;
  for (const index of marked) {
    const tick = make("span", "vw-tick");
    tick.style.left = ((index + 0.5) / slices) * 100 + "%";
    tick.title = "slice " + (index + 1) + ": interpolated";
    sliceMarks.appendChild(tick);
  }
  sliceMarks.hidden = !marked.length;
  viewerRoot.dataset.interpolated = String(interpolated().size);
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
  drawSliceMarks();
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

function placeCanvas(size) {
  // Shown in millimetres: a coronal plane of 3 mm slabs is not squashed.
  const [rowsAxis, columnsAxis] = PLANES[view.plane].axes;
  const heightMm = size.rows * view.meta.spacing_mm[rowsAxis];
  const widthMm = size.columns * view.meta.spacing_mm[columnsAxis];
  const room = Math.max(100, Math.min(stage.clientWidth, stage.clientHeight) - STAGE_MARGIN);
  const scale = room / Math.max(heightMm, widthMm);
  canvas.style.width = Math.round(widthMm * scale) + "px";
  canvas.style.height = Math.round(heightMm * scale) + "px";
  canvas.style.transform = "translate(" + view.panX + "px, " + view.panY + "px) scale(" + view.zoom + ")";
}

function draw() {
  viewerRoot.dataset.plane = view.plane;
  viewerRoot.dataset.width = String(view.width);
  viewerRoot.dataset.level = String(view.level);
  viewerRoot.dataset.zoom = String(view.zoom);
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
  const filled = interpolated();
  const [rowsAxis, columnsAxis, sliceAxis] = PLANES[plane].axes;
  const markRows = rowsAxis === interpolatedAxis();
  const markColumns = columnsAxis === interpolatedAxis();
  let out = 0;
  for (let r = 0; r < size.rows; r++) {
    const markedRow = markRows && filled.has(r);
    for (let c = 0; c < size.columns; c++) {
      let offset;
      if (plane === "axial") offset = index * planeStride + r * columns + c;
      else if (plane === "coronal") offset = r * planeStride + index * columns + c;
      else offset = r * planeStride + c * columns + index;
      const grey = lut[codes[offset]];
      const edge = (markedRow && (c < 3 || c >= size.columns - 3)) ||
        (markColumns && filled.has(c) && (r < 3 || r >= size.rows - 3));
      pixels[out] = edge ? 229 : grey;
      pixels[out + 1] = edge ? 57 : grey;
      pixels[out + 2] = edge ? 53 : grey;
      pixels[out + 3] = 255;
      out += 4;
    }
  }
  context.putImageData(image, 0, 0);
  placeCanvas(size);
  const name = plane.charAt(0).toUpperCase() + plane.slice(1);
  const position = (index * meta.spacing_mm[sliceAxis]).toFixed(1);
  const isFilled = sliceAxis === interpolatedAxis() && filled.has(index);
  text($(".vw-info"), name + " " + (index + 1) + "/" + size.slices + " · " + position + " mm · W " + view.width + " L " + view.level +
    (view.zoom > 1 ? " · ×" + view.zoom.toFixed(1) : ""));
  const badge = $(".vw-filled");
  badge.hidden = !isFilled;
  viewerRoot.dataset.sliceInterpolated = isFilled ? "1" : "0";
}

function cursorText(event) {
  if (!view.codes) return "";
  const box = canvas.getBoundingClientRect();
  const size = planeSize(view.plane);
  const column = Math.floor(((event.clientX - box.left) / box.width) * size.columns);
  const row = Math.floor(((event.clientY - box.top) / box.height) * size.rows);
  if (column < 0 || row < 0 || column >= size.columns || row >= size.rows) return "";
  const [rowsAxis, columnsAxis] = PLANES[view.plane].axes;
  const down = (row * view.meta.spacing_mm[rowsAxis]).toFixed(1);
  const across = (column * view.meta.spacing_mm[columnsAxis]).toFixed(1);
  return "cursor " + across + " mm across, " + down + " mm down";
}

function zoomBy(factor) {
  view.zoom = Math.max(ZOOM_LIMITS[0], Math.min(ZOOM_LIMITS[1], view.zoom * factor));
  if (view.zoom === 1) { view.panX = 0; view.panY = 0; }
  draw();
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
stage.tabIndex = 0;
stage.addEventListener("wheel", (event) => {
  if (!view.codes) return;
  event.preventDefault();
  if (event.ctrlKey) zoomBy(event.deltaY > 0 ? 1 / 1.25 : 1.25);
  else setSlice(view.slice[view.plane] + (event.deltaY > 0 ? 1 : -1));
}, { passive: false });
stage.addEventListener("keydown", (event) => {
  const steps = { ArrowDown: 1, ArrowUp: -1, PageDown: 10, PageUp: -10 };
  if (view.codes && event.key in steps) {
    event.preventDefault();
    setSlice(view.slice[view.plane] + steps[event.key]);
  } else if (view.codes && (event.key === "+" || event.key === "-")) {
    zoomBy(event.key === "+" ? 1.25 : 1 / 1.25);
  }
});
stage.addEventListener("dblclick", () => { view.zoom = 1; view.panX = 0; view.panY = 0; draw(); });
let drag = null;
stage.addEventListener("contextmenu", (event) => event.preventDefault());
stage.addEventListener("mousedown", (event) => {
  if (event.button === 2) drag = { kind: "window", x: event.clientX, y: event.clientY, width: view.width, level: view.level };
  if (event.button === 0 && view.zoom > 1) drag = { kind: "pan", x: event.clientX, y: event.clientY, panX: view.panX, panY: view.panY };
});
window.addEventListener("mousemove", (event) => {
  if (drag && drag.kind === "window") setWindow(drag.width + (event.clientX - drag.x) * 4, drag.level + (event.clientY - drag.y) * 2, "");
  if (drag && drag.kind === "pan") {
    view.panX = drag.panX + event.clientX - drag.x;
    view.panY = drag.panY + event.clientY - drag.y;
    placeCanvas(planeSize(view.plane));
  }
});
window.addEventListener("mouseup", () => { drag = null; });
stage.addEventListener("mousemove", (event) => text($(".vw-cursor"), cursorText(event)));
stage.addEventListener("mouseleave", () => text($(".vw-cursor"), ""));
new ResizeObserver(() => view.codes && placeCanvas(planeSize(view.plane))).observe(stage);
$(".sv-back").addEventListener("click", () => {
  const list = document.getElementById("worklist");
  if (list) list.scrollIntoView({ behavior: "smooth", block: "start" });
});
