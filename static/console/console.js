// Small helpers shared by console pages. Page-specific code lives in its own file.
"use strict";

function esdCsrf() {
  const match = document.cookie.match(/(?:^|; )csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

// Call the ESD API as the signed-in user (session + CSRF); resolves to the parsed envelope.
async function esdApi(method, path, body) {
  const response = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRFToken": esdCsrf()},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const error = new Error(data.message || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const target = document.querySelector(button.dataset.copy);
  if (target) {
    navigator.clipboard.writeText(target.textContent.trim()).then(() => { button.textContent = "Copied"; });
  }
});
