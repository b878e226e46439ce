// The generate form: LoRA rows, img2img-only fields, endpoints of the chosen type, and one submit at a time.
"use strict";

(function () {
  const form = document.getElementById("generate-form");
  if (!form) return;

  // --- LoRA rows: add a copy of the first row with its values cleared; remove any but the last one left.
  const rows = document.getElementById("lora-rows");
  const addButton = document.getElementById("add-lora");
  if (rows && addButton) {
    addButton.addEventListener("click", () => {
      const first = rows.querySelector(".lora-row");
      if (!first) return;
      const row = first.cloneNode(true);
      row.querySelector("select").value = "";
      row.querySelector("input").value = "1";
      rows.appendChild(row);
      row.querySelector("select").focus();
    });
    rows.addEventListener("click", (event) => {
      const button = event.target.closest(".remove-lora");
      if (!button) return;
      const row = button.closest(".lora-row");
      if (rows.querySelectorAll(".lora-row").length > 1) {
        row.remove();
      } else {
        row.querySelector("select").value = "";
        row.querySelector("input").value = "1";
      }
    });
  }

  // --- img2img fields only show for img2img, txt2img ones (hires fix, variation seed) for txt2img.
  const task = form.elements.task_type;
  function showTaskFields() {
    // style, not the hidden attribute: the layout classes (.row is display: flex) would win over [hidden].
    form.querySelectorAll("[data-task]").forEach((element) => {
      element.style.display = element.dataset.task === task.value ? "" : "none";
    });
  }
  if (task) {
    task.addEventListener("change", showTaskFields);
    showTaskFields();
  }

  // --- a named endpoint must be of the chosen type: hide the others (and drop a choice that no longer fits).
  const type = form.elements.inference_type;
  const endpoint = form.elements.endpoint;
  function showEndpoints() {
    if (!type || !endpoint) return;
    for (const option of endpoint.options) {
      if (!option.dataset.type) continue;
      const fits = option.dataset.type === type.value;
      option.hidden = !fits;
      option.disabled = !fits;
      if (!fits && option.selected) endpoint.value = "";
    }
  }
  if (type) {
    type.addEventListener("change", showEndpoints);
    showEndpoints();
  }

  // --- one submit at a time: the server creates a job per post.
  form.addEventListener("submit", () => {
    const submit = document.getElementById("generate-submit");
    if (submit) {
      setTimeout(() => { submit.disabled = true; submit.textContent = "Submitting…"; }, 0);
    }
  });
})();
