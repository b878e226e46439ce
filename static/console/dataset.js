// Dataset upload from the browser: register the files with POST /datasets, PUT each one to its presigned URL
// (a few at a time), then PUT /datasets/{name} status Enabled and reload the list.
"use strict";

(function () {
  const form = document.getElementById("dataset-form");
  if (!form) return;
  const MAX_FILES = 100;   // the API's limit per dataset (contract §9.5)
  const PARALLEL = 4;
  const bar = document.getElementById("dataset-progress");
  const message = document.getElementById("dataset-message");
  const submit = document.getElementById("dataset-submit");

  function say(text, kind) {
    message.textContent = text;
    message.className = "msg" + (kind ? " " + kind : "");
    message.hidden = !text;
  }

  function showProgress(fraction) {
    bar.hidden = false;
    bar.firstElementChild.style.width = Math.round(100 * Math.min(1, fraction)) + "%";
  }

  function typeOf(file) {
    if (file.type) return file.type;
    return /\.(txt|caption)$/i.test(file.name) ? "text/plain" : "application/octet-stream";
  }

  // PUT with XMLHttpRequest: fetch reports no upload progress.
  function put(url, file, onProgress) {
    return new Promise((resolve, reject) => {
      const request = new XMLHttpRequest();
      request.open("PUT", url);
      request.upload.addEventListener("progress", (event) => onProgress(event.loaded));
      request.addEventListener("load", () => {
        if (request.status >= 200 && request.status < 300) {
          onProgress(file.size);
          resolve();
        } else {
          reject(new Error(`upload of ${file.name} failed: HTTP ${request.status}`));
        }
      });
      request.addEventListener("error", () => reject(new Error(`upload of ${file.name} failed: network error`)));
      request.send(file);
    });
  }

  async function uploadAll(files, urls) {
    const total = files.reduce((sum, file) => sum + file.size, 0) || 1;
    const sent = new Map();
    const report = () => showProgress([...sent.values()].reduce((a, b) => a + b, 0) / total);
    const queue = files.slice();
    async function worker() {
      while (queue.length) {
        const file = queue.shift();
        const url = urls[file.name];
        if (!url) throw new Error(`no upload URL for ${file.name}`);
        await put(url, file, (loaded) => { sent.set(file.name, loaded); report(); });
      }
    }
    await Promise.all(Array.from({length: Math.min(PARALLEL, files.length)}, worker));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const api = form.dataset.api || "/api/";
    const name = form.elements.dataset_name.value.trim();
    const prefix = form.elements.prefix.value.trim();
    const description = form.elements.description.value.trim();
    const files = Array.from(form.elements.files.files);
    if (!name) return say("Give the dataset a name.", "error");
    if (!files.length) return say("Choose the images and their captions.", "error");
    if (files.length > MAX_FILES) return say(`At most ${MAX_FILES} files per dataset; ${files.length} chosen.`, "error");
    const content = files.map((file) => ({filename: file.name, name: file.name, type: typeOf(file), params: {}}));
    submit.disabled = true;
    say(`Registering ${files.length} files…`);
    showProgress(0);
    let registered = false;
    try {
      const created = await esdApi("POST", api + "datasets", {
        dataset_name: name,
        prefix,
        params: description ? {description} : {},
        creator: form.dataset.user || "",
        content,
      });
      registered = true;
      say(`Uploading ${files.length} files…`);
      await uploadAll(files, created.data.s3PresignUrl);
      say("Enabling the dataset…");
      await esdApi("PUT", api + "datasets/" + encodeURIComponent(name), {status: "Enabled"});
      say("Done.", "success");
      window.location.reload();
    } catch (error) {
      let text = error.message || String(error);
      if (registered) {
        // Half a dataset would train on the wrong data: remove it so the same name can be uploaded again.
        try {
          await esdApi("DELETE", api + "datasets", {dataset_name_list: [name]});
          text += ` (dataset ${name} was removed; try again)`;
        } catch (ignored) {
          text += ` (dataset ${name} is incomplete: delete it before uploading again)`;
        }
      }
      say(text, "error");
      submit.disabled = false;
    }
  });
})();
