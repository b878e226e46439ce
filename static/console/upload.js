// Models page: upload checkpoint files from the browser straight to storage (contract §9.4, multipart).
//
// Why in the browser: the presigned part URLs let the files go to the bucket (or the local store) directly, so a
// multi-gigabyte model never passes through a web worker. Steps: POST /api/checkpoints with the files' part counts,
// PUT every part to its URL (a few at a time, each retried), keep each part's ETag, then PUT /api/checkpoints/{id}
// with status Active and the ETags, which assembles the files and activates the checkpoint. A part that still fails
// after its retries leaves the ETags already collected in place, so "Resume" sends only the missing parts.
"use strict";

(() => {
  const MiB = 1024 * 1024;
  const PART_BYTES = 8 * MiB; // every part but the last must be at least 5 MiB (S3's rule)
  const MAX_PARTS = 10000; // S3's (and the API's) limit on parts per file
  const PARALLEL = 3;
  const RETRIES = 3; // tries after the first one, per part
  const RETRY_DELAY_MS = 500;

  const panel = document.getElementById("upload-panel");
  if (!panel) return;
  const input = document.getElementById("upload-file");
  const typeSelect = document.getElementById("upload-type");
  const startButton = document.getElementById("upload-start");
  const resumeButton = document.getElementById("upload-resume");
  const bar = document.getElementById("upload-progress");
  const bytesText = document.getElementById("upload-bytes");
  const statusText = document.getElementById("upload-status");
  const api = panel.dataset.api;

  // The upload in progress or stopped by a failure: {id, files: [{file, name, parts: [{number, start, end, url,
  // etag}]}], total, done}. Null when nothing can be resumed.
  let upload = null;
  let busy = false;

  function partSize(size) {
    // 8 MiB, grown in whole MiB only when a file would otherwise need more than MAX_PARTS parts.
    return Math.max(PART_BYTES, Math.ceil(size / MAX_PARTS / MiB) * MiB);
  }

  function planParts(file) {
    const size = partSize(file.size);
    const count = Math.max(1, Math.ceil(file.size / size));
    const parts = [];
    for (let number = 1; number <= count; number++) {
      const start = (number - 1) * size;
      parts.push({number, start, end: Math.min(file.size, start + size), url: null, etag: null});
    }
    return parts;
  }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < MiB) return `${(n / 1024).toFixed(1)} KiB`;
    if (n < 1024 * MiB) return `${(n / MiB).toFixed(1)} MiB`;
    return `${(n / (1024 * MiB)).toFixed(2)} GiB`;
  }

  function showProgress() {
    const done = upload ? upload.done : 0;
    const total = upload ? upload.total : 0;
    const percent = total ? Math.floor((done * 100) / total) : (upload && upload.finished ? 100 : 0);
    bar.setAttribute("aria-valuenow", String(percent));
    bar.firstElementChild.style.width = `${percent}%`;
    bytesText.textContent = upload ? `${formatBytes(done)} of ${formatBytes(total)}` : "";
  }

  function setStatus(text, kind) {
    statusText.textContent = text;
    statusText.className = kind ? `msg ${kind}` : "";
  }

  function setBusy(value) {
    busy = value;
    startButton.disabled = value;
    input.disabled = value;
    typeSelect.disabled = value;
    resumeButton.disabled = value;
  }

  function showResume(visible) {
    resumeButton.style.display = visible ? "" : "none";
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function putPart(entry, part) {
    const response = await fetch(part.url, {method: "PUT", body: entry.file.slice(part.start, part.end)});
    if (!response.ok) throw new Error(`storage answered ${response.status}`);
    const etag = response.headers.get("ETag");
    if (!etag) throw new Error("storage sent no ETag header (its CORS settings must expose ETag)");
    return etag;
  }

  async function sendPart(entry, part) {
    let lastError = null;
    for (let attempt = 0; attempt <= RETRIES; attempt++) {
      if (attempt > 0) await sleep(RETRY_DELAY_MS * attempt);
      try {
        part.etag = await putPart(entry, part);
        upload.done += part.end - part.start;
        showProgress();
        return;
      } catch (error) {
        lastError = error;
      }
    }
    throw new Error(`part ${part.number} of ${entry.name} failed after ${RETRIES + 1} tries: ${lastError.message}`);
  }

  // Send every part without an ETag, PARALLEL at a time; after the first part that fails for good, start no more.
  async function sendMissingParts() {
    const queue = [];
    for (const entry of upload.files) {
      for (const part of entry.parts) if (!part.etag) queue.push([entry, part]);
    }
    const total = queue.length;
    let sent = 0;
    let failure = null;
    setStatus(`Uploading… 0 of ${total} parts sent`);
    async function lane() {
      while (queue.length && !failure) {
        const [entry, part] = queue.shift();
        try {
          await sendPart(entry, part);
          sent += 1;
          setStatus(`Uploading… ${sent} of ${total} parts sent`);
        } catch (error) {
          failure = failure || error;
        }
      }
    }
    await Promise.all(Array.from({length: Math.min(PARALLEL, queue.length)}, lane));
    if (failure) throw failure;
  }

  async function complete() {
    const tags = {};
    for (const entry of upload.files) {
      tags[entry.name] = entry.parts.map((p) => ({ETag: p.etag, PartNumber: p.number}));
    }
    setStatus("Completing the upload…");
    await esdApi("PUT", `${api}/${upload.id}`, {status: "Active", multi_parts_tags: tags});
  }

  async function refreshList() {
    // Swap in the list as the server now renders it (the new checkpoint is Active), keeping this panel's status.
    try {
      const response = await fetch(window.location.href, {credentials: "same-origin"});
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById("model-list");
      const current = document.getElementById("model-list");
      if (fresh && current) {
        current.replaceWith(fresh);
        if (window.htmx) window.htmx.process(fresh);
      }
    } catch (error) {
      // The upload itself succeeded; a reload shows the list.
    }
  }

  async function run() {
    setBusy(true);
    showResume(false);
    try {
      await sendMissingParts();
      await complete();
      upload.finished = true;
      showProgress();
      const names = upload.files.map((f) => f.name).join(", ");
      upload = null;
      setStatus(`${names}: Uploaded`, "success");
      await refreshList();
    } catch (error) {
      setStatus(`${error.message}. Resume sends only the missing parts.`, "error");
      showResume(true);
    } finally {
      setBusy(false);
    }
  }

  async function start() {
    const files = Array.from(input.files || []);
    if (!files.length) {
      setStatus("Choose one or more files first.", "error");
      return;
    }
    const entries = files.map((file) => ({file, name: file.name, parts: planParts(file)}));
    upload = null;
    showProgress();
    showResume(false);
    setBusy(true);
    setStatus("Registering the checkpoint…");
    let answer;
    try {
      answer = await esdApi("POST", api, {
        checkpoint_type: typeSelect.value,
        params: {},
        filenames: entries.map((e) => ({filename: e.name, parts_number: e.parts.length})),
      });
    } catch (error) {
      setStatus(`Failed: ${error.message}`, "error");
      setBusy(false);
      return;
    }
    const urls = answer.data.s3PresignUrl;
    for (const entry of entries) {
      entry.parts.forEach((part, index) => { part.url = urls[entry.name][index]; });
    }
    upload = {
      id: answer.data.checkpoint.id,
      files: entries,
      total: files.reduce((n, f) => n + f.size, 0),
      done: 0,
      finished: false,
    };
    showProgress();
    await run();
  }

  startButton.addEventListener("click", () => { if (!busy) start(); });
  resumeButton.addEventListener("click", () => { if (!busy && upload) run(); });
  input.addEventListener("change", () => {
    // Other files: whatever was stopped cannot be resumed with them (its checkpoint stays Initial; delete it).
    if (busy) return;
    upload = null;
    showResume(false);
    showProgress();
    setStatus("");
  });
  window.addEventListener("beforeunload", (event) => {
    if (busy) event.preventDefault();
  });
})();
