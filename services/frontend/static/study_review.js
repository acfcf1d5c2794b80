// -- the review -----------------------------------------------------------------------------
// A radiologist records their reading: agree with the call, or disagree (their call, and
// optionally each finding present or absent), with a comment. A study without a call (Not
// analysed, Failed) is confirmed as it is, or given the reader's own call. Sent as the
// "study_review" event (services/frontend/page_actions.py), which checks the role and writes
// the audit.
const reviewForm = $(".sv-review-form");
const reviewCall = $(".sv-review-pathology");
const reviewState = { key: null, agrees: null, opposite: "" };

function fillReview(study) {
  const list = $(".sv-reviews");
  list.replaceChildren();
  for (const review of study.reviews || []) {
    const item = make("li", "sv-review-item", review.who + " " + review.verdict + " · " + review.when);
    for (const line of review.findings) item.appendChild(make("div", "sv-detail", line));
    if (review.comment) item.appendChild(make("div", "sv-detail", "“" + review.comment + "”"));
    list.appendChild(item);
  }
  if (!(study.reviews || []).length) list.appendChild(make("li", "sv-none", study.may_review ? "not reviewed yet" : "not reviewed"));
  $(".sv-review").hidden = !study.may_review && !(study.reviews || []).length;
  reviewForm.hidden = !study.may_review;
  if (reviewState.key === study.key) return; // a refresh keeps what is being typed
  reviewState.key = study.key;
  reviewState.agrees = null;
  // Disagreeing with a call starts from the other call; without a call the reader picks one.
  reviewState.opposite = study.badge === "pathology" ? "false" : study.badge === "normal" ? "true" : "";
  reviewForm.reset();
  text($(".sv-agree"), study.has_call ? "Agree with the call" : "Confirm: " + study.badge_text);
  text($(".sv-disagree"), study.has_call ? "Disagree" : "Make my own call");
  text($(".sv-review-call").firstChild, study.has_call ? "My call: " : "Call: ");
  $(".sv-review-findings").hidden = !(study.finding_labels || []).length;
  const findings = $(".sv-review-findings div");
  findings.replaceChildren();
  for (const label of study.finding_labels || []) {
    const row = make("label", null, label);
    const choice = make("select");
    choice.dataset.label = label;
    for (const [value, name] of [["", "not marked"], ["true", "present"], ["false", "absent"]]) {
      const option = make("option", null, name);
      option.value = value;
      choice.appendChild(option);
    }
    row.appendChild(choice);
    findings.appendChild(row);
  }
  showChoice();
}

function showChoice() {
  for (const button of reviewForm.querySelectorAll("[data-agrees]")) {
    button.classList.toggle("active", reviewState.agrees !== null && button.dataset.agrees === (reviewState.agrees ? "1" : "0"));
  }
  $(".sv-review-more").hidden = reviewState.agrees !== false;
  // A disagreement names the reader's call.
  $(".sv-review-save").disabled = reviewState.agrees === null || (reviewState.agrees === false && !reviewCall.value);
}

for (const button of reviewForm.querySelectorAll("[data-agrees]")) {
  button.addEventListener("click", () => {
    reviewState.agrees = button.dataset.agrees === "1";
    if (!reviewState.agrees && !reviewCall.value) reviewCall.value = reviewState.opposite;
    showChoice();
  });
}
reviewCall.addEventListener("change", showChoice);
reviewForm.addEventListener("submit", (event) => {
  event.preventDefault();
  if (reviewState.agrees === null || !props.value) return;
  const findings = {};
  if (!reviewState.agrees) {
    for (const choice of reviewForm.querySelectorAll("select[data-label]")) {
      if (choice.value) findings[choice.dataset.label] = choice.value === "true";
    }
  }
  const call = reviewCall.value;
  trigger("study_review", {
    key: props.value.key,
    agrees: reviewState.agrees,
    pathology: reviewState.agrees || !call ? null : call === "true",
    findings: findings,
    comment: $(".sv-review-comment").value,
  });
  reviewState.key = null; // the redrawn study starts a fresh form
});
