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
