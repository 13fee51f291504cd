// medsam3 viewer: plain JavaScript, no build step, everything served by the same app.
"use strict";

(function () {
  // The first ten colours of medsam3.visualize.label_colors: colour k means concept k everywhere.
  const PALETTE = [
    [255, 64, 64], [64, 200, 255], [255, 210, 0], [60, 220, 90], [220, 80, 255],
    [255, 140, 20], [0, 230, 200], [255, 100, 180], [150, 110, 255], [170, 255, 60],
  ];
  const ALPHA = 0.45;
  const VIEW = 560;

  const $ = (id) => document.getElementById(id);
  const state = {
    token: sessionStorage.getItem("medsam3-token") || "",
    info: null,
    session: null,
    concepts: [],          // {text, visible}
    boxes: [],             // {box: [x0, y0, x1, y1], label: 1 | 0}
    drag: null,
    image: null,           // ImageBitmap of the current picture
    imageKey: "",
    slice: 0,
    windowName: "",
    result: null,          // last 2D result body
    resultMasks: {},       // prompt index -> Uint8Array (H * W), 1 inside
    job: null,             // last volume job body
    labelSlices: new Map(),// slice -> Uint8Array label map
    pictures: new Map(),   // "slice|window" -> ImageBitmap
    stats: { overlayPixels: {}, draws: 0 },
    busy: false,
    pollTimer: null,
  };
  window.medsam3Viewer = state; // for debugging (and the browser test)

  const color = (k) => PALETTE[(k - 1) % PALETTE.length];
  const css = (rgb) => `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text || "";
    el.className = isError ? "error" : "";
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (state.token) h["Authorization"] = "Bearer " + state.token;
    return h;
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    const response = await fetch(path, opts);
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try {
        const body = await response.json();
        if (body && body.error) message = body.error;
      } catch (e) { /* not JSON */ }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return response;
  }

  const apiJSON = async (path, options) => (await api(path, options)).json();

  function postJSON(path, body) {
    return apiJSON(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  async function bitmap(path) {
    const blob = await (await api(path)).blob();
    return createImageBitmap(blob);
  }

  // PNG mask (gray) -> Uint8Array of its values, via an offscreen canvas.
  async function pngValues(path) {
    const bmp = await bitmap(path);
    const canvas = document.createElement("canvas");
    canvas.width = bmp.width;
    canvas.height = bmp.height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bmp, 0, 0);
    const rgba = ctx.getImageData(0, 0, bmp.width, bmp.height).data;
    const out = new Uint8Array(bmp.width * bmp.height);
    for (let i = 0; i < out.length; i++) out[i] = rgba[i * 4];
    return out;
  }

  // ---------------------------------------------------------------------------- start-up

  async function start() {
    try {
      const health = await apiJSON("/api/health");
      $("auth-section").hidden = !health.auth_required;
      $("token").value = state.token;
      await loadInfo();
    } catch (e) {
      setStatus("server not reachable: " + e.message, true);
    }
  }

  async function loadInfo() {
    try {
      state.info = await apiJSON("/api/info");
    } catch (e) {
      $("model-info").textContent = "";
      setStatus(e.status === 401 ? "enter the server's token" : e.message, true);
      return;
    }
    const info = state.info;
    $("model-info").textContent = `model ${info.model} on ${info.device}`;
    const list = $("concept-list");
    list.innerHTML = "";
    for (const concept of info.concepts) {
      const option = document.createElement("option");
      option.value = concept;
      list.appendChild(option);
    }
    const select = $("window");
    select.innerHTML = '<option value="">auto</option>';
    for (const name of Object.keys(info.windows)) {
      const option = document.createElement("option");
      option.value = name;
      const [c, w] = info.windows[name];
      option.textContent = `${name} (${c}/${w})`;
      select.appendChild(option);
    }
    setStatus("ready");
  }

  // ---------------------------------------------------------------------------- upload

  async function upload(file) {
    const form = new FormData();
    form.append("file", file, file.name);
    setStatus("uploading " + file.name + "...");
    resetResults();
    state.session = null;
    state.pictures.clear();
    state.image = null;
    updateButtons();
    try {
      state.session = await apiJSON("/api/sessions", { method: "POST", body: form });
    } catch (e) {
      $("upload-info").textContent = e.message;
      setStatus("upload refused", true);
      draw();
      return;
    }
    const s = state.session;
    const size = s.kind === "volume" ? `${s.shape.join(" x ")} voxels` : `${s.width} x ${s.height} px`;
    $("upload-info").textContent = `${s.name}: ${s.kind} (${s.format}), ${size}` +
      (s.modality ? `, ${s.modality}` : "") + (s.notes.length ? " - " + s.notes.join("; ") : "");
    state.boxes = [];
    renderBoxes();
    const isVolume = s.kind === "volume";
    $("display-section").hidden = !(isVolume || s.is_ct);
    $("slice-row").hidden = !isVolume;
    $("window-row").hidden = !s.is_ct;
    $("window").value = "";
    state.windowName = "";
    if (isVolume) {
      const slider = $("slice");
      slider.max = String(s.slices - 1);
      state.slice = Math.floor(s.slices / 2);
      slider.value = String(state.slice);
    }
    $("segment").textContent = isVolume ? "Segment slice" : "Segment image";
    $("segment-volume").hidden = !isVolume;
    $("view-hint").textContent = isVolume ? "Scroll slices with the slider (or the mouse wheel)." : "Drag to draw a box.";
    await showPicture();
    setStatus("uploaded " + s.name);
    updateButtons();
  }

  async function showPicture() {
    const s = state.session;
    if (!s) return;
    const params = new URLSearchParams();
    if (s.kind === "volume") params.set("slice", String(state.slice));
    if (state.windowName) params.set("window", state.windowName);
    const key = params.toString();
    let picture = state.pictures.get(key);
    if (!picture) {
      try {
        picture = await bitmap(`/api/sessions/${s.id}/image.png?${key}`);
      } catch (e) {
        setStatus(e.message, true);
        return;
      }
      if (state.pictures.size > 64) state.pictures.clear();
      state.pictures.set(key, picture);
    }
    state.image = picture;
    state.imageKey = key;
    if (s.kind === "volume") $("slice-label").textContent = `${state.slice} / ${s.slices - 1}`;
    await loadLabelSlice();
    draw();
  }

  // ---------------------------------------------------------------------------- concepts

  function addConcept(text) {
    text = (text || "").trim().replace(/\s+/g, " ");
    if (!text) return;
    if (!state.concepts.some((c) => c.text === text)) state.concepts.push({ text, visible: true });
    $("concept").value = "";
    $("suggestions").innerHTML = "";
    renderConcepts();
    updateButtons();
  }

  function renderConcepts() {
    const ul = $("concepts");
    ul.innerHTML = "";
    state.concepts.forEach((concept, i) => {
      const li = document.createElement("li");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = concept.visible;
      box.title = "show / hide";
      box.className = "toggle";
      box.addEventListener("change", () => { concept.visible = box.checked; draw(); });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = css(color(i + 1));
      const label = document.createElement("span");
      label.textContent = concept.text;
      label.className = "concept-name";
      const remove = document.createElement("button");
      remove.textContent = "x";
      remove.className = "remove";
      remove.title = "remove";
      remove.addEventListener("click", () => {
        state.concepts.splice(i, 1);
        renderConcepts();
        updateButtons();
        draw();
      });
      li.append(box, swatch, label, remove);
      ul.appendChild(li);
    });
  }

  let suggestTimer = null;
  let suggestSeq = 0;
  function suggestSoon() {
    clearTimeout(suggestTimer);
    suggestTimer = setTimeout(suggest, 250);
  }

  async function suggest() {
    const text = $("concept").value.trim();
    const box = $("suggestions");
    if (!text) { box.innerHTML = ""; return; }
    const seq = ++suggestSeq;
    let found;
    try {
      found = await apiJSON("/api/concepts?" + new URLSearchParams({ q: text, k: "4" }));
    } catch (e) {
      return;
    }
    if (seq !== suggestSeq) return; // a newer request is on its way
    box.innerHTML = "";
    if (found.known) {
      const known = document.createElement("span");
      known.className = "known";
      known.textContent = "known concept";
      box.appendChild(known);
    }
    for (const candidate of found.suggestions) {
      if (candidate.concept === text) continue;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "suggestion";
      button.textContent = `${candidate.concept} ${candidate.similarity.toFixed(2)}`;
      button.dataset.concept = candidate.concept;
      button.title = `via ${candidate.via}`;
      button.addEventListener("click", () => addConcept(candidate.concept));
      box.appendChild(button);
    }
  }

  // ---------------------------------------------------------------------------- boxes on the canvas

  function viewScale() {
    if (!state.image) return 1;
    return Math.min(VIEW / state.image.width, VIEW / state.image.height);
  }

  function imagePoint(event) {
    const canvas = $("view");
    const rect = canvas.getBoundingClientRect();
    const sx = canvas.width / rect.width;
    const sy = canvas.height / rect.height;
    const scale = viewScale();
    const x = ((event.clientX - rect.left) * sx) / scale;
    const y = ((event.clientY - rect.top) * sy) / scale;
    return [Math.max(0, Math.min(state.image.width, x)), Math.max(0, Math.min(state.image.height, y))];
  }

  function boxKind(event) {
    if (event.shiftKey) return 0;
    return document.querySelector('input[name="box-kind"]:checked').value === "0" ? 0 : 1;
  }

  function onDown(event) {
    if (!state.image) return;
    const [x, y] = imagePoint(event);
    state.drag = { x0: x, y0: y, x1: x, y1: y, label: boxKind(event) };
    $("view").setPointerCapture(event.pointerId);
    event.preventDefault();
  }

  function onMove(event) {
    if (!state.drag) return;
    const [x, y] = imagePoint(event);
    state.drag.x1 = x;
    state.drag.y1 = y;
    draw();
  }

  function onUp(event) {
    if (!state.drag) return;
    const d = state.drag;
    state.drag = null;
    const box = [Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1), Math.max(d.y0, d.y1)]
      .map((v) => Math.round(v * 10) / 10);
    if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) {
      state.boxes.push({ box, label: d.label, slice: state.session && state.session.kind === "volume" ? state.slice : null });
      renderBoxes();
    }
    draw();
  }

  function renderBoxes() {
    const ul = $("box-list");
    ul.innerHTML = "";
    state.boxes.forEach((b, i) => {
      const li = document.createElement("li");
      const where = b.slice === null || b.slice === undefined ? "" : ` on slice ${b.slice}`;
      li.textContent = `${b.label ? "+" : "-"} [${b.box.map((v) => v.toFixed(0)).join(", ")}]${where}`;
      const remove = document.createElement("button");
      remove.textContent = "x";
      remove.className = "remove";
      remove.addEventListener("click", () => { state.boxes.splice(i, 1); renderBoxes(); draw(); });
      li.appendChild(remove);
      ul.appendChild(li);
    });
  }

  // ---------------------------------------------------------------------------- drawing

  function visibleConcept(text) {
    const concept = state.concepts.find((c) => c.text === text);
    return concept ? concept.visible : false;
  }

  function conceptColor(text, fallback) {
    const i = state.concepts.findIndex((c) => c.text === text);
    return color(i >= 0 ? i + 1 : fallback);
  }

  // The masks to show on the current picture: [{key, rgb, values (Uint8Array), test(v)}].
  function layers() {
    const out = [];
    const s = state.session;
    if (!s || !state.image) return out;
    const r = state.result;
    const here = r && (s.kind !== "volume" || r.slice === state.slice) && r.session === s.id;
    if (here) {
      for (const p of r.prompts) {
        const values = state.resultMasks[p.index];
        if (values && visibleConcept(p.asked)) {
          out.push({ key: p.asked, rgb: conceptColor(p.asked, p.index), values, label: 255 });
        }
      }
    }
    const job = state.job;
    const labels = state.labelSlices.get(state.slice);
    if (job && job.status === "done" && labels && job.session === s.id && !here) {
      job.prompts.forEach((text, i) => {
        const asked = job.normalization && job.normalization[i] ? job.normalization[i].asked : text;
        if (visibleConcept(asked)) out.push({ key: asked, rgb: conceptColor(asked, i + 1), values: labels, label: i + 1 });
      });
    }
    return out;
  }

  function draw() {
    const canvas = $("view");
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    state.stats.overlayPixels = {};
    if (!state.image) return;
    const w = state.image.width;
    const h = state.image.height;
    const scale = viewScale();
    const cw = Math.max(1, Math.round(w * scale));
    const ch = Math.max(1, Math.round(h * scale));
    if (canvas.width !== cw || canvas.height !== ch) {
      canvas.width = cw;
      canvas.height = ch;
    }
    ctx.imageSmoothingEnabled = false;
    // The picture and its overlay are composed at image resolution, then scaled once.
    const work = document.createElement("canvas");
    work.width = w;
    work.height = h;
    const wctx = work.getContext("2d", { willReadFrequently: true });
    wctx.drawImage(state.image, 0, 0);
    const shown = layers();
    if (shown.length) {
      const frame = wctx.getImageData(0, 0, w, h);
      const px = frame.data;
      for (const layer of shown) {
        let count = 0;
        const [cr, cg, cb] = layer.rgb;
        for (let i = 0; i < w * h; i++) {
          const v = layer.values[i];
          if (layer.label === 255 ? v > 127 : v === layer.label) {
            const o = i * 4;
            px[o] = (1 - ALPHA) * px[o] + ALPHA * cr;
            px[o + 1] = (1 - ALPHA) * px[o + 1] + ALPHA * cg;
            px[o + 2] = (1 - ALPHA) * px[o + 2] + ALPHA * cb;
            count++;
          }
        }
        state.stats.overlayPixels[layer.key] = (state.stats.overlayPixels[layer.key] || 0) + count;
      }
      wctx.putImageData(frame, 0, 0);
    }
    ctx.drawImage(work, 0, 0, w * scale, h * scale);
    // Instances of the 2D result: boxes with scores.
    const r = state.result;
    const s = state.session;
    if (r && r.session === s.id && (s.kind !== "volume" || r.slice === state.slice)) {
      ctx.font = "13px system-ui, sans-serif";
      for (const p of r.prompts) {
        if (!visibleConcept(p.asked)) continue;
        const rgb = conceptColor(p.asked, p.index);
        p.instances.forEach((inst, n) => {
          const [x0, y0, x1, y1] = inst.box.map((v) => v * scale);
          ctx.strokeStyle = css(rgb);
          ctx.lineWidth = 2;
          ctx.setLineDash([]);
          ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
          const tag = `${p.prompt} #${n + 1} ${inst.score.toFixed(2)}`;
          const tw = ctx.measureText(tag).width + 6;
          const ty = y0 - 17 >= 0 ? y0 - 17 : y0;
          ctx.fillStyle = css(rgb);
          ctx.fillRect(x0, ty, tw, 17);
          ctx.fillStyle = rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114 > 150 ? "#000" : "#fff";
          ctx.fillText(tag, x0 + 3, ty + 13);
        });
      }
    }
    // The user's boxes (positive green, negative red, dashed), and the one being drawn.
    const boxes = state.boxes.filter((b) => b.slice === null || b.slice === undefined || b.slice === state.slice);
    const drawing = state.drag ? [{ box: [state.drag.x0, state.drag.y0, state.drag.x1, state.drag.y1], label: state.drag.label }] : [];
    for (const b of boxes.concat(drawing)) {
      const [x0, y0, x1, y1] = b.box.map((v) => v * scale);
      ctx.strokeStyle = b.label ? "#50ff80" : "#ff5050";
      ctx.lineWidth = 2;
      ctx.setLineDash([6, 4]);
      ctx.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    }
    ctx.setLineDash([]);
    state.stats.draws++;
  }

  // ---------------------------------------------------------------------------- segmenting

  function updateButtons() {
    const ready = Boolean(state.session) && state.concepts.length > 0 && !state.busy;
    $("segment").disabled = !ready;
    $("segment-volume").disabled = !ready || !(state.session && state.session.kind === "volume");
  }

  function resetResults() {
    state.result = null;
    state.resultMasks = {};
    state.job = null;
    state.labelSlices.clear();
    $("results").innerHTML = '<span class="hint">No results yet.</span>';
    $("downloads").textContent = "-";
  }

  async function segment() {
    const s = state.session;
    if (!s || !state.concepts.length) return;
    const here = state.boxes.filter((b) => b.slice === null || b.slice === undefined || b.slice === state.slice);
    const body = {
      concepts: state.concepts.map((c) => c.text),
      boxes: here.filter((b) => b.label === 1).map((b) => b.box),
      negative_boxes: here.filter((b) => b.label === 0).map((b) => b.box),
    };
    if (s.kind === "volume") body.slice = state.slice;
    if (state.windowName) body.window = state.windowName;
    state.busy = true;
    updateButtons();
    setStatus("segmenting...");
    try {
      const result = await postJSON(`/api/sessions/${s.id}/segment`, body);
      const masks = {};
      for (const p of result.prompts) masks[p.index] = await pngValues(p.downloads.mask);
      state.result = result;
      state.resultMasks = masks;
      renderResult(result);
      setStatus(`done in ${result.seconds.toFixed(3)} s` + (result.encoded ? "" : " (cached image features)"));
    } catch (e) {
      setStatus(e.message, true);
    } finally {
      state.busy = false;
      updateButtons();
      draw();
    }
  }

  function renderResult(result) {
    const panel = $("results");
    panel.innerHTML = "";
    for (const note of result.notes) {
      const div = document.createElement("div");
      div.className = "note";
      div.textContent = note;
      panel.appendChild(div);
    }
    for (const p of result.prompts) {
      const div = document.createElement("div");
      div.className = "prompt";
      div.dataset.prompt = p.prompt;
      const title = document.createElement("div");
      title.className = "title";
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = css(conceptColor(p.asked, p.index));
      const name = document.createElement("span");
      name.textContent = p.prompt;
      title.append(swatch, name);
      if (p.asked !== p.prompt) {
        const asked = document.createElement("span");
        asked.className = "asked";
        asked.textContent = `(asked: ${p.asked})`;
        title.appendChild(asked);
      }
      div.appendChild(title);
      const summary = document.createElement("div");
      summary.className = "hint";
      const mm = p.area_mm2 === null ? "" : `, ${p.area_mm2.toFixed(1)} mm²`;
      summary.textContent = `presence ${p.presence.toFixed(3)}, ${p.count} instance(s), ${p.area} px${mm}`;
      div.appendChild(summary);
      if (p.instances.length) {
        const table = document.createElement("table");
        table.innerHTML = "<tr><th>#</th><th>score</th><th>area px</th><th>box</th></tr>";
        p.instances.forEach((inst, n) => {
          const tr = document.createElement("tr");
          tr.className = "instance";
          tr.innerHTML = `<td>${n + 1}</td><td class="score">${inst.score.toFixed(3)}</td><td>${inst.area}</td>` +
            `<td>${inst.box.map((v) => v.toFixed(0)).join(",")}</td>`;
          table.appendChild(tr);
        });
        div.appendChild(table);
      }
      panel.appendChild(div);
    }
    const dl = $("downloads");
    dl.innerHTML = "";
    for (const p of result.prompts) {
      addDownload(dl, `${p.prompt}: mask PNG`, p.downloads.mask, `${p.filename}.png`, "mask-" + p.index);
      addDownload(dl, `${p.prompt}: instances PNG`, p.downloads.instances, `${p.filename}_instances.png`);
    }
    addDownload(dl, "label map PNG (all concepts)", result.downloads.labels, "labels.png");
    addDownload(dl, "overlay PNG", result.downloads.overlay, "overlay.png");
    if (result.downloads.dicom_seg) addDownload(dl, "DICOM-SEG", result.downloads.dicom_seg, "seg.dcm");
  }

  function addDownload(parent, text, url, filename, id) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "download";
    button.textContent = "\u2193 " + text;
    button.dataset.url = url;
    button.dataset.filename = filename;
    if (id) button.id = "download-" + id;
    button.addEventListener("click", () => download(url, filename));
    parent.appendChild(button);
  }

  async function download(url, filename) {
    try {
      const blob = await (await api(url)).blob();
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = filename;
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
      setStatus("downloaded " + filename);
    } catch (e) {
      setStatus(e.message, true);
    }
  }

  // ---------------------------------------------------------------------------- volume jobs

  async function segmentVolume() {
    const s = state.session;
    if (!s || s.kind !== "volume") return;
    const body = { concepts: state.concepts.map((c) => c.text) };
    // Every positive box drawn on a slice is a key box: the server propagates each object through
    // the volume from it (several lesions, or the first and last slice of one long structure).
    const keys = state.boxes.filter((b) => b.label === 1 && b.slice !== null && b.slice !== undefined);
    if (keys.length) body.key_boxes = keys.map((b) => ({ slice: b.slice, box: b.box }));
    if (state.windowName) body.window = state.windowName;
    state.busy = true;
    updateButtons();
    try {
      state.job = await postJSON(`/api/sessions/${s.id}/jobs`, body);
      state.result = null;
      state.labelSlices.clear();
      $("cancel-job").hidden = false;
      $("job-progress").hidden = false;
      pollJob();
    } catch (e) {
      setStatus(e.message, true);
      state.busy = false;
      updateButtons();
    }
  }

  async function pollJob() {
    const job = state.job;
    if (!job) return;
    try {
      state.job = await apiJSON(`/api/jobs/${job.id}`);
    } catch (e) {
      setStatus(e.message, true);
      finishJob();
      return;
    }
    const j = state.job;
    const bar = $("job-progress");
    bar.max = Math.max(1, j.progress.total);
    bar.value = j.progress.done;
    $("job-status").textContent = `job ${j.status}: ${j.progress.done} / ${j.progress.total} slices` +
      (j.error ? ` - ${j.error}` : "");
    if (j.status === "queued" || j.status === "running") {
      state.pollTimer = setTimeout(pollJob, 300);
      return;
    }
    finishJob();
    if (j.status === "done") {
      renderJob(j);
      await loadLabelSlice();
      draw();
      setStatus(`volume done in ${j.seconds.toFixed(2)} s`);
    } else {
      setStatus(`job ${j.status}` + (j.error ? ": " + j.error : ""), j.status === "failed");
    }
  }

  function finishJob() {
    clearTimeout(state.pollTimer);
    state.busy = false;
    $("cancel-job").hidden = true;
    updateButtons();
  }

  async function cancelJob() {
    if (!state.job) return;
    try {
      await api(`/api/jobs/${state.job.id}/cancel`, { method: "POST" });
    } catch (e) {
      setStatus(e.message, true);
    }
  }

  function renderJob(job) {
    const panel = $("results");
    panel.innerHTML = "";
    for (const note of job.notes.concat(job.result.notes || [])) {
      const div = document.createElement("div");
      div.className = "note";
      div.textContent = note;
      panel.appendChild(div);
    }
    job.result.prompts.forEach((p, i) => {
      const asked = job.normalization && job.normalization[i] ? job.normalization[i].asked : p.prompt;
      const div = document.createElement("div");
      div.className = "prompt";
      div.dataset.prompt = p.prompt;
      const title = document.createElement("div");
      title.className = "title";
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = css(conceptColor(asked, i + 1));
      const name = document.createElement("span");
      name.textContent = p.prompt;
      title.append(swatch, name);
      div.appendChild(title);
      const summary = document.createElement("div");
      summary.className = "hint volume";
      const range = p.slices ? `slices ${p.slices[0]}-${p.slices[1]}` : "not found";
      const ml = p.volume_ml === null ? "" : `, ${p.volume_ml.toFixed(2)} mL`;
      summary.textContent = `${p.voxels} voxels${ml}, ${range}, best score ${p.max_score.toFixed(3)}`;
      div.appendChild(summary);
      panel.appendChild(div);
    });
    const dl = $("downloads");
    dl.innerHTML = "";
    addDownload(dl, "label map NIfTI (input geometry)", job.downloads.nifti, "mask.nii.gz", "nifti");
    addDownload(dl, "label map NRRD", job.downloads.nrrd, "mask.nrrd");
    if (job.downloads.dicom_seg) addDownload(dl, "DICOM-SEG", job.downloads.dicom_seg, "seg.dcm", "dicom-seg");
  }

  async function loadLabelSlice() {
    const job = state.job;
    if (!job || job.status !== "done" || !state.session || job.session !== state.session.id) return;
    if (state.labelSlices.has(state.slice)) return;
    try {
      state.labelSlices.set(state.slice, await pngValues(`/api/jobs/${job.id}/labels/${state.slice}.png`));
    } catch (e) {
      setStatus(e.message, true);
    }
  }

  // ---------------------------------------------------------------------------- wiring

  function wire() {
    $("file").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
    $("token").addEventListener("change", (e) => {
      state.token = e.target.value.trim();
      sessionStorage.setItem("medsam3-token", state.token);
      loadInfo();
    });
    $("concept").addEventListener("input", suggestSoon);
    $("concept").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); addConcept(e.target.value); } });
    $("add-concept").addEventListener("click", () => addConcept($("concept").value));
    $("clear-boxes").addEventListener("click", () => { state.boxes = []; renderBoxes(); draw(); });
    $("segment").addEventListener("click", segment);
    $("segment-volume").addEventListener("click", segmentVolume);
    $("cancel-job").addEventListener("click", cancelJob);
    $("slice").addEventListener("input", (e) => { state.slice = Number(e.target.value); showPicture(); });
    $("window").addEventListener("change", (e) => { state.windowName = e.target.value; showPicture(); });
    const canvas = $("view");
    canvas.addEventListener("pointerdown", onDown);
    canvas.addEventListener("pointermove", onMove);
    canvas.addEventListener("pointerup", onUp);
    canvas.addEventListener("wheel", (e) => {
      const s = state.session;
      if (!s || s.kind !== "volume") return;
      e.preventDefault();
      const next = Math.max(0, Math.min(s.slices - 1, state.slice + (e.deltaY > 0 ? 1 : -1)));
      if (next !== state.slice) {
        state.slice = next;
        $("slice").value = String(next);
        showPicture();
      }
    }, { passive: false });
    draw();
  }

  wire();
  start();
})();
