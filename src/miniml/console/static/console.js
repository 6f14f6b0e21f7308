// The console's only script: upload progress and drop, live pages, auto-submitting pickers.
// Pages work without it (plain forms and links); it adds progress and live updates.
"use strict";

function uploadWithProgress(form) {
  const input = form.querySelector("input[type=file]");
  const bar = form.querySelector("progress");
  const status = form.querySelector("[role=status]");
  form.addEventListener("submit", (event) => {
    if (!input.files.length) return;
    event.preventDefault();
    send(input.files[0]);
  });
  form.addEventListener("dragover", (event) => { event.preventDefault(); form.classList.add("over"); });
  form.addEventListener("dragleave", () => form.classList.remove("over"));
  form.addEventListener("drop", (event) => {
    event.preventDefault();
    form.classList.remove("over");
    if (event.dataTransfer.files.length) send(event.dataTransfer.files[0]);
  });
  function send(file) {
    const body = new FormData();
    body.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("X-CSRF-Token", form.dataset.csrf);
    bar.hidden = false;
    bar.value = 0;
    status.textContent = "Uploading " + file.name + "…";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total; };
    xhr.upload.onload = () => { status.textContent = "Checking " + file.name + "…"; };
    xhr.onload = () => {
      let answer = {};
      try { answer = JSON.parse(xhr.responseText); } catch (e) { answer = {}; }
      if (xhr.status >= 200 && xhr.status < 300 && answer.location) {
        window.location.assign(answer.location);
      } else {
        bar.hidden = true;
        status.textContent = "Upload refused (" + xhr.status + "): " + (answer.detail || xhr.statusText);
        status.className = "error";
      }
    };
    xhr.onerror = () => { status.textContent = "The upload did not reach the server."; status.className = "error"; };
    xhr.send(body);
  }
}

function live(box) {
  if (box.dataset.terminal === "yes") return;
  const tick = async () => {
    try {
      const answer = await fetch(box.dataset.live, { headers: { Accept: "text/html" }, credentials: "same-origin" });
      if (answer.redirected || answer.status === 401) { window.location.reload(); return; }
      if (answer.ok) {
        const html = await answer.text();
        const doc = new DOMParser().parseFromString(html, "text/html");
        const fresh = doc.body;
        box.replaceChildren(...fresh.childNodes);
        const state = box.querySelector("#job-state");
        if (state && ["succeeded", "failed", "cancelled"].includes(state.textContent.trim())) {
          window.location.reload();
          return;
        }
      }
    } catch (e) { /* the next tick tries again */ }
    setTimeout(tick, 2000);
  };
  setTimeout(tick, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form#upload").forEach(uploadWithProgress);
  document.querySelectorAll("[data-live]").forEach(live);
  document.querySelectorAll("select[data-autosubmit]").forEach((select) => {
    select.addEventListener("change", () => select.form.submit());
  });
});
