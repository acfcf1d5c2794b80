// Who is signed in, their role, the audit trail for those allowed it, and signing out.
// Runs as the js_on_load of a gr.HTML whose value is {name, role, sign_in, audit}
// (services/frontend/views.py, user_bar); every value is set as text.
const bar = element.querySelector(".ub");

function render() {
  const value = props.value || {};
  bar.replaceChildren();
  if (!value.name) return;
  const who = document.createElement("span");
  who.className = "ub-name";
  who.textContent = value.name;
  const role = document.createElement("span");
  role.className = "ub-role";
  role.textContent = value.role;
  bar.append(who, role);
  if (value.audit) {
    const audit = document.createElement("a");
    audit.href = "admin/audit";
    audit.textContent = "Audit trail";
    audit.target = "_blank";
    bar.append(audit);
  }
  if (value.sign_in) {
    const out = document.createElement("button");
    out.type = "button";
    out.id = "sign-out";
    out.textContent = "Sign out";
    out.addEventListener("click", () => window.ctsSignOut());
    bar.append(out);
  }
}

watch("value", render);
render();
