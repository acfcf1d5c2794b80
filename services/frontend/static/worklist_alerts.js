// Alerts for a triage shift, run before worklist.js (which calls noteArrivals after each
// drawing): the tab's title counts the unreviewed PATHOLOGY studies, and, once the user
// allows it, a browser notification (and, if chosen, a short tone) says when a new one
// arrives. Studies listed when the page opens are not announced.
const ALERTS_KEY = "cts-alerts"; // "off" | "notify" | "sound"
const PAGE_TITLE = "Chest CT screening";
const alertState = { known: null, mode: localStorage.getItem(ALERTS_KEY) || "off" };
const alertsBox = element.querySelector(".wl-alerts");
const alertsButton = document.createElement("button");
alertsButton.type = "button";
alertsButton.className = "wl-alerts-button";
alertsBox.appendChild(alertsButton);

function showAlertsMode() {
  const words = { off: "Alerts: off", notify: "Alerts: on", sound: "Alerts: on + sound" };
  alertsButton.textContent = words[alertState.mode] || words.off;
  alertsButton.classList.toggle("on", alertState.mode !== "off");
  alertsButton.title = "A browser notification when a new PATHOLOGY result arrives (click to change)";
  element.dataset.alerts = alertState.mode;
}

async function nextAlertsMode() {
  const order = ["off", "notify", "sound"];
  let mode = order[(order.indexOf(alertState.mode) + 1) % order.length];
  if (mode !== "off" && "Notification" in window && Notification.permission === "default") {
    await Notification.requestPermission();
  }
  if (mode !== "off" && (!("Notification" in window) || Notification.permission !== "granted")) {
    mode = "off";
    alertsButton.title = "The browser does not allow notifications from this page";
  }
  alertState.mode = mode;
  localStorage.setItem(ALERTS_KEY, mode);
  showAlertsMode();
}

function tone() {
  const audio = new AudioContext();
  const oscillator = audio.createOscillator();
  const gain = audio.createGain();
  oscillator.frequency.value = 880;
  gain.gain.value = 0.15;
  oscillator.connect(gain).connect(audio.destination);
  oscillator.start();
  oscillator.stop(audio.currentTime + 0.35);
}

function noteArrivals(rows) {
  // The component's first value is a placeholder; the studies listed in the first value
  // from the server are the baseline, not arrivals.
  if (!props.value || !props.value.time_zone) return;
  const waiting = rows.filter((row) => row.badge === "pathology" && !row.reviewed);
  document.title = (waiting.length ? "(" + waiting.length + ") " : "") + PAGE_TITLE;
  const keys = new Set(waiting.map((row) => row.key));
  const fresh = alertState.known === null ? [] : waiting.filter((row) => !alertState.known.has(row.key));
  alertState.known = keys;
  if (!fresh.length || alertState.mode === "off" || !("Notification" in window) || Notification.permission !== "granted") return;
  // The notification names no patient: it can show on a locked screen.
  const body = fresh.length === 1
    ? "P(pathology) " + (fresh[0].probability == null ? "?" : fresh[0].probability.toFixed(2)) + (fresh[0].finding ? " · " + fresh[0].finding : "")
    : fresh.length + " new PATHOLOGY studies";
  const notice = new Notification("New PATHOLOGY result", { body: body, tag: "cts-pathology" });
  notice.onclick = () => { window.focus(); open(fresh[0].key); };
  element.dataset.notified = String(Number(element.dataset.notified || "0") + fresh.length);
  if (alertState.mode === "sound") tone();
}

alertsButton.addEventListener("click", nextAlertsMode);
showAlertsMode();
