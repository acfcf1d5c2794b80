// Every request this page sends to its own server carries the session's CSRF token (the
// server refuses a state-changing request without it: services/frontend/auth/gate.py).
// The token is in the readable cts_csrf cookie; the session cookie itself is HttpOnly.
(() => {
  const token = () => {
    const found = document.cookie.split("; ").find((part) => part.startsWith("cts_csrf="));
    return found ? decodeURIComponent(found.slice("cts_csrf=".length)) : "";
  };
  const sameOrigin = (url) => {
    try { return new URL(url, window.location.href).origin === window.location.origin; }
    catch (error) { return false; }
  };
  const originalFetch = window.fetch.bind(window);
  window.fetch = (input, init) => {
    const url = input instanceof Request ? input.url : String(input);
    if (!sameOrigin(url)) return originalFetch(input, init);
    const options = { ...(init || {}) };
    const headers = new Headers(options.headers || (input instanceof Request ? input.headers : undefined));
    headers.set("X-CSRF-Token", token());
    options.headers = headers;
    return originalFetch(input, options);
  };
  const originalOpen = XMLHttpRequest.prototype.open;
  const originalSend = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function open(method, url, ...rest) {
    this.ctsSameOrigin = sameOrigin(url);
    return originalOpen.call(this, method, url, ...rest);
  };
  XMLHttpRequest.prototype.send = function send(body) {
    if (this.ctsSameOrigin) this.setRequestHeader("X-CSRF-Token", token());
    return originalSend.call(this, body);
  };
  window.ctsSignOut = () =>
    window.fetch("sign-out", { method: "POST" }).finally(() => window.location.assign("sign-in"));
})();
