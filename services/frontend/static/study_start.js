// The study view fits the window: what sits above the viewer (the header with the patient,
// the call) keeps its height, the viewer and its controls take the rest (--sv-room), its
// stage about square (--vw-side); the panel beside it scrolls within the same height.
const FIT_MARGIN = 12; // pixels left below the viewer's help line
const MIN_ROOM = 360;

function fitStudy() {
  if ($(".sv-body").hidden) return;
  const grid = $(".sv-grid");
  const top = grid.getBoundingClientRect().top - element.getBoundingClientRect().top;
  const room = Math.max(MIN_ROOM, Math.floor(window.innerHeight - top - FIT_MARGIN));
  const viewer = $(".sv-viewer");
  const controls = viewer.getBoundingClientRect().height - $(".vw-stage").getBoundingClientRect().height;
  const side = Math.max(300, Math.floor(room - controls));
  // Only a change is written: the observer below sees every write.
  if (element.style.getPropertyValue("--sv-room") !== room + "px") element.style.setProperty("--sv-room", room + "px");
  if (element.style.getPropertyValue("--vw-side") !== side + "px") element.style.setProperty("--vw-side", side + "px");
}
window.addEventListener("resize", fitStudy);
new ResizeObserver(fitStudy).observe(element);

setWindow(PRESETS.lung.width, PRESETS.lung.level, "lung");
fill();
fitStudy();
watch("value", () => {
  fill();
  fitStudy();
  // A study the user opened comes into view; a refresh, or the study reopened after a page
  // reload, leaves the page where it is (the worklist stays above the fold).
  const outer = document.getElementById("study-view");
  if (outer) outer.dataset.shownKey = props.value ? props.value.key : "";
  if (props.value && element.dataset.shown !== props.value.key) {
    element.dataset.shown = props.value.key;
    if (document.body.dataset.ctsOpenedByUser === "1") {
      element.scrollIntoView({ behavior: "smooth", block: "start" });
    }
  }
  delete document.body.dataset.ctsOpenedByUser;
});
