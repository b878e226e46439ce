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

  // --- inpainting: paint the area to repaint on the chosen input image. The strokes are kept at the image's own
  // size on a separate canvas; on submit that becomes a black-and-white PNG mask (white = repaint) in a hidden field.
  const canvas = document.getElementById("mask-canvas");
  const drawing = form.elements.mask_drawing;
  const imageInput = form.elements.init_image;
  if (canvas && drawing && imageInput) {
    const hint = document.getElementById("mask-hint");
    const brush = document.getElementById("mask-brush");
    const strokes = document.createElement("canvas");
    const picture = new Image();
    let painted = false;
    let down = false;
    function redraw() {
      const context = canvas.getContext("2d");
      context.clearRect(0, 0, canvas.width, canvas.height);
      context.drawImage(picture, 0, 0);
      context.globalAlpha = 0.6;
      context.drawImage(strokes, 0, 0);
      context.globalAlpha = 1;
    }
    function clear() {
      strokes.getContext("2d").clearRect(0, 0, strokes.width, strokes.height);
      painted = false;
      drawing.value = "";
      if (picture.width) redraw();
    }
    function paint(event) {
      const box = canvas.getBoundingClientRect();
      const x = ((event.clientX - box.left) * canvas.width) / box.width;
      const y = ((event.clientY - box.top) * canvas.height) / box.height;
      const context = strokes.getContext("2d");
      context.fillStyle = "#ffffff";
      context.beginPath();
      context.arc(x, y, (Number(brush.value) * canvas.width) / box.width / 2, 0, 2 * Math.PI);
      context.fill();
      painted = true;
      redraw();
    }
    picture.addEventListener("load", () => {
      for (const target of [canvas, strokes]) {
        target.width = picture.naturalWidth;
        target.height = picture.naturalHeight;
      }
      canvas.hidden = false;
      hint.textContent = "Paint the area to repaint (white in the mask).";
      clear();
    });
    imageInput.addEventListener("change", () => {
      const file = imageInput.files && imageInput.files[0];
      if (file) picture.src = URL.createObjectURL(file);
    });
    canvas.addEventListener("pointerdown", (event) => { down = true; canvas.setPointerCapture(event.pointerId); paint(event); });
    canvas.addEventListener("pointermove", (event) => { if (down) paint(event); });
    canvas.addEventListener("pointerup", () => { down = false; });
    document.getElementById("mask-clear").addEventListener("click", clear);
    form.addEventListener("submit", () => {
      if (!painted) { drawing.value = ""; return; }
      const mask = document.createElement("canvas");
      mask.width = strokes.width;
      mask.height = strokes.height;
      const context = mask.getContext("2d");
      context.fillStyle = "#000000";
      context.fillRect(0, 0, mask.width, mask.height);
      context.drawImage(strokes, 0, 0);
      drawing.value = mask.toDataURL("image/png");
    });
  }

  // --- one submit at a time: the server creates a job per post.
  form.addEventListener("submit", () => {
    const submit = document.getElementById("generate-submit");
    if (submit) {
      setTimeout(() => { submit.disabled = true; submit.textContent = "Submitting…"; }, 0);
    }
  });
})();
