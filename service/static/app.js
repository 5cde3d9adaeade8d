// The attention explorer: takes an image (drop, picker or paste), calls POST /embed for the CLS
// attention and the patch features, and draws per-head heatmaps, their mean, the thresholded
// mask and a PCA of the patch features. Plain ES module, no dependencies, same-origin only.

import {
  attentionMask,
  decodeArray,
  headMean,
  heatmapRgba,
  pcaRgb,
  viridisGradient,
} from "/static/analysis.js";

const MAIN_PANEL_SIZE = 640; // longest canvas side of the large panels, in canvas pixels
const HEAD_PANEL_SIZE = 320; // longest canvas side of the per-head panels
const MASK_DIM_ALPHA = 0.7; // how much the patches outside the mask are darkened
const MASK_OUTLINE = "#ffd400";

const $ = (id) => document.getElementById(id);

const state = {
  file: null,
  image: null, // decoded HTMLImageElement of the file, null when the browser cannot show it
  imageUrl: null,
  controller: null,
  view: null, // interpreted /embed result, see interpretResponse
  pca: null, // {rgba, milliseconds} for state.view
};

function setStatus(message) {
  $("status").textContent = message;
}

function clearError() {
  $("error").hidden = true;
  $("error-message").textContent = "";
  $("retry").hidden = true;
}

function showError(message, retryable) {
  $("error-message").textContent = message;
  $("retry").hidden = !retryable;
  $("error").hidden = false;
}

function withoutStop(message) {
  return String(message).replace(/[.\s]+$/, "");
}

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MiB`;
}

// The characters of a bearer token (RFC 6750's b64token), which is what the service accepts.
const TOKEN_PATTERN = /^[A-Za-z0-9\-._~+/]+=*$/;

class KeyError extends Error {}

/** The Authorization header for the key typed in; a KeyError for a key no server would take. */
function apiHeaders() {
  const key = $("api-key").value.trim();
  if (!key) return {};
  if (!TOKEN_PATTERN.test(key)) {
    throw new KeyError(
      "The API key may only contain letters, digits and - . _ ~ + / (with = at the end): " +
        "check what was typed or pasted under \"API key\".",
    );
  }
  return { Authorization: `Bearer ${key}` };
}

// ---------------------------------------------------------------------------------------------
// Model information

/** The serving model of a GET /v1/models answer ({name, ready, loaded: {...}, last_error}). */
function servingModel(body) {
  if (!body || typeof body !== "object") return null;
  if (body.loaded && typeof body.loaded === "object") return body.loaded;
  for (const key of ["models", "data"]) {
    if (Array.isArray(body[key]) && body[key].length) return body[key][0];
  }
  return null;
}

function showModel(model) {
  if (!model) return;
  const text = (value) =>
    value === undefined || value === null || value === "" ? "–" : String(value);
  $("model-name").textContent = text(model.name);
  $("model-version").textContent = text(model.version);
  $("model-provider").textContent = text(
    model.execution_provider ?? model.provider ?? model.providers?.[0],
  );
  const shape = [model.num_heads, model.embed_dim, model.patch_size];
  $("model-shape").textContent = shape.every((v) => v !== undefined && v !== null)
    ? `${model.num_heads} heads / ${model.embed_dim} / ${model.patch_size} px`
    : "–";
}

async function loadModelInfo() {
  try {
    let headers;
    try {
      headers = apiHeaders();
    } catch (error) {
      if (!(error instanceof KeyError)) throw error;
      setStatus(error.message);
      return;
    }
    const response = await fetch("/v1/models", { headers });
    if (response.status === 401 || response.status === 403) {
      setStatus('The service needs an API key: enter it under "API key", then choose an image.');
      return;
    }
    if (!response.ok) {
      setStatus(`The service answered HTTP ${response.status} for its model list.`);
      return;
    }
    const body = await response.json();
    const model = servingModel(body);
    if (model) {
      showModel(model);
    } else {
      $("model-name").textContent = body.name ? String(body.name) : "–";
      const reason = body.last_error ? `: ${body.last_error}` : "";
      setStatus(`No model serves yet${reason}. Images sent now will be refused.`);
    }
  } catch (error) {
    setStatus(`Could not reach the service: ${withoutStop(error.message)}.`);
  }
}

// ---------------------------------------------------------------------------------------------
// Input: drop zone, file picker, paste

function wireInput() {
  const zone = $("drop-zone");
  const input = $("file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " " || event.key === "Spacebar") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    if (input.files && input.files.length) chooseFile(input.files[0], input.files.length);
    input.value = ""; // choosing the same file again still fires "change"
  });
  // Accept a drop anywhere on the page, and never let the browser navigate to a dropped file.
  let depth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    depth += 1;
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) zone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    depth = 0;
    zone.classList.remove("dragging");
    const files = event.dataTransfer ? event.dataTransfer.files : null;
    if (files && files.length) chooseFile(files[0], files.length);
    else showError("Nothing to use in that drop: drop an image file.", false);
  });
  document.addEventListener("paste", (event) => {
    const items = event.clipboardData ? Array.from(event.clipboardData.items) : [];
    const item = items.find((entry) => entry.kind === "file");
    if (!item) return; // plain text pasted into a field
    event.preventDefault();
    const file = item.getAsFile();
    if (file) chooseFile(file, 1);
  });
}

function chooseFile(file, count) {
  state.file = file;
  const name = file.name || "pasted image";
  const note = count > 1 ? ` (the first of ${count} files)` : "";
  $("file-name").textContent = `${name}, ${formatBytes(file.size)}${note}`;
  analyse(file);
}

function loadPreview(file) {
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  const url = URL.createObjectURL(file);
  state.imageUrl = url;
  const preview = $("preview");
  const image = new Image();
  image.src = url;
  return image
    .decode()
    .then(() => {
      if (url !== state.imageUrl) return null; // a newer file was chosen meanwhile
      preview.src = url;
      const size = `${image.naturalWidth} × ${image.naturalHeight} pixels`;
      preview.alt = `Input image ${file.name || "pasted"} (${size})`;
      preview.hidden = false;
      return image;
    })
    .catch(() => {
      if (url !== state.imageUrl) return null;
      preview.hidden = true;
      preview.removeAttribute("src");
      preview.alt = "The browser cannot display this file";
      return null;
    });
}

// ---------------------------------------------------------------------------------------------
// The /embed call

const IMAGE_ERRORS = new Set([
  "not_an_image",
  "corrupt_image",
  "empty_image",
  "unsupported_image_format",
]);

function describeError(status, body, headers) {
  const detail = body && body.error ? body.error : {};
  const code = detail.code || "";
  const suffix = detail.message ? ` (${detail.message})` : "";
  if (IMAGE_ERRORS.has(code) || status === 415) {
    return [`This file is not an image the service can read${suffix}.`, false];
  }
  switch (status) {
    case 413:
      if (code === "too_many_tokens" || code === "response_too_large") {
        // The file size is not the cause: the whole image (crop=none) at the model's resolution
        // makes more patches than the service allows, which only a less elongated image avoids.
        return [
          `The image is too wide or too tall for this service's limits${suffix}. ` +
            "Crop it closer to a square and try again.",
          false,
        ];
      }
      return [`The image is too large for this service${suffix}. Try a smaller file.`, false];
    case 401:
    case 403:
      return [`The service needs a valid API key${suffix}. Enter it under "API key".`, true];
    case 400:
    case 422:
      return [`The service rejected the request${suffix}.`, false];
    case 429: {
      const wait = headers.get("Retry-After");
      const when = wait ? `try again in ${wait} s` : "try again shortly";
      return [`The server is busy${suffix}: ${when}.`, true];
    }
    case 408:
      return [`The upload took too long${suffix}. Check the connection and retry.`, true];
    case 503:
      return [`The service is not ready${suffix}. Try again shortly.`, true];
    default:
      return [`The service failed with HTTP ${status}${suffix}.`, status >= 500];
  }
}

function parseServerTiming(headers) {
  const parts = [];
  const header = headers.get("Server-Timing");
  if (header) {
    for (const entry of header.split(",")) {
      const [name, ...params] = entry.trim().split(";");
      const duration = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
      if (name && duration) parts.push(`${name} ${Number(duration.slice(4)).toFixed(1)} ms`);
    }
  }
  for (const name of ["X-Process-Time", "X-Inference-Time", "X-Response-Time"]) {
    const value = headers.get(name);
    if (value) parts.push(`${name.replace(/^X-/, "").toLowerCase()} ${value}`);
  }
  return parts.length ? parts.join(", ") : "not reported by the service";
}

async function analyse(file) {
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  clearError();
  clearResults();
  const results = $("results");
  results.dataset.state = "loading";
  results.setAttribute("aria-busy", "true");
  setStatus(`Sending ${file.name || "the image"} (${formatBytes(file.size)}) to the model…`);

  const previewPromise = loadPreview(file);
  const form = new FormData();
  form.append("images", file, file.name || "pasted-image");
  form.append("outputs", "cls,patch,attention");
  form.append("crop", "none");
  form.append("encoding", "base64");
  form.append("dtype", "float32");

  let headers;
  try {
    headers = apiHeaders();
  } catch (error) {
    if (!(error instanceof KeyError)) throw error;
    fail(error.message, false);
    return;
  }
  const started = performance.now();
  let response;
  let text;
  try {
    response = await fetch("/embed", {
      method: "POST",
      body: form,
      headers,
      signal: controller.signal,
    });
    text = await response.text();
  } catch (error) {
    if (controller.signal.aborted) return;
    fail(`Could not reach the service: ${withoutStop(error.message)}.`, true);
    return;
  }
  const roundTrip = performance.now() - started;
  if (controller !== state.controller) return;

  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  $("timing-roundtrip").textContent =
    `${roundTrip.toFixed(0)} ms (${formatBytes(text.length)} received)`;
  $("timing-server").textContent = parseServerTiming(response.headers);
  if (!response.ok) {
    const [message, retryable] = describeError(response.status, body, response.headers);
    fail(message, retryable);
    return;
  }
  let view;
  try {
    view = interpretResponse(body);
  } catch (error) {
    fail(`The service's answer could not be read: ${error.message}.`, false);
    return;
  }
  state.image = await previewPromise;
  if (controller !== state.controller) return;
  state.view = view;
  state.pca = null;
  showModel(view.model);
  $("timing-grid").textContent =
    `${view.rows} × ${view.cols} patches of ${view.patchSize ?? "?"} px, ` +
    `${view.heads} heads, dim ${view.dim}`;
  if (!state.image) {
    setStatus("The browser cannot display this image format; the maps are drawn without it.");
  }
  renderAttention();
  setStatus(`Computing the PCA of ${view.rows * view.cols} patch features in the browser…`);
  await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
  if (controller !== state.controller) return;
  renderPca();
  results.dataset.state = "ready";
  results.removeAttribute("aria-busy");
  setStatus(
    `Done: ${view.heads} attention heads on a ${view.rows} × ${view.cols} patch grid ` +
      `in ${roundTrip.toFixed(0)} ms.`,
  );
}

function clearResults() {
  state.view = null;
  state.pca = null;
  for (const id of ["mean-canvas", "mask-canvas", "pca-canvas"]) {
    const canvas = $(id);
    canvas.removeAttribute("width"); // back to a blank default canvas, hidden by the style sheet
    canvas.removeAttribute("height");
  }
  $("mean-canvas").setAttribute("aria-label", "Mean attention over all heads (no result yet)");
  $("mask-canvas").setAttribute(
    "aria-label",
    "Thresholded mask of the mean attention (no result yet)",
  );
  $("pca-canvas").setAttribute("aria-label", "PCA of the patch features as RGB (no result yet)");
  $("mask-caption").textContent = "Mask of the mean";
  $("heads").replaceChildren();
  for (const id of ["timing-roundtrip", "timing-server", "timing-grid", "timing-pca"]) {
    $(id).textContent = "–";
  }
}

function fail(message, retryable) {
  const results = $("results");
  results.dataset.state = "error";
  results.removeAttribute("aria-busy");
  setStatus("The last image could not be analysed.");
  showError(message, retryable);
}

// ---------------------------------------------------------------------------------------------
// Interpreting the response

function pick(object, names) {
  if (!object) return undefined;
  for (const name of names) {
    if (object[name] !== undefined && object[name] !== null) return object[name];
  }
  return undefined;
}

function asSize(value) {
  // {height, width} | {h, w} | [height, width]
  if (!value) return null;
  if (Array.isArray(value) && value.length >= 2) return { height: +value[0], width: +value[1] };
  const height = pick(value, ["height", "h", "rows"]);
  const width = pick(value, ["width", "w", "cols"]);
  return height !== undefined && width !== undefined ? { height: +height, width: +width } : null;
}

/** Drops leading axes of length 1 beyond the API's rank (a batch axis of one image). */
function stripLeadingOnes(array, rank) {
  while (array.shape.length > rank && array.shape[0] === 1) array.shape = array.shape.slice(1);
  return array;
}

/** Turns the JSON body of /embed into the arrays and geometry the page draws. */
function interpretResponse(body) {
  if (!body || typeof body !== "object") throw new Error("not a JSON object");
  const results = pick(body, ["results", "data", "items"]);
  const result = Array.isArray(results) ? results[0] : body;
  if (!result) throw new Error("no result in the answer");
  const model = body.model || {};

  const attention = decodeArray(pick(result, ["attention_maps", "attention", "attentions"]));
  const features = decodeArray(pick(result, ["patch_features", "patch", "patch_tokens"]));
  if (!attention) throw new Error("no attention maps in the answer");
  if (!features) throw new Error("no patch features in the answer");

  let grid = result.grid;
  let rows = +pick(grid, ["rows", "height", "h", "grid_h"]) || +pick(result, ["grid_h", "rows"]);
  let cols = +pick(grid, ["cols", "width", "w", "grid_w"]) || +pick(result, ["grid_w", "cols"]);
  if (Array.isArray(grid)) [rows, cols] = grid.map(Number);

  stripLeadingOnes(attention, 3);
  if (attention.shape.length === 3 && attention.shape[1] * attention.shape[2] > 0) {
    if (!rows || !cols) [rows, cols] = [attention.shape[1], attention.shape[2]];
  } else if (attention.shape.length !== 2) {
    throw new Error(`unexpected attention shape [${attention.shape}]`);
  }
  const heads = attention.shape[0];
  const patches = attention.data.length / heads;

  stripLeadingOnes(features, 3);
  const dim = features.shape[features.shape.length - 1];
  if (features.shape.length === 3 && (!rows || !cols)) [rows, cols] = features.shape;
  if (!rows || !cols) {
    rows = Math.round(Math.sqrt(patches));
    cols = patches / rows;
  }
  if (rows * cols !== patches) {
    throw new Error(`grid ${rows}×${cols} does not match ${patches} patches`);
  }
  if (features.data.length !== patches * dim) {
    throw new Error("patch features do not match the grid");
  }

  const patchSize = +pick(model, ["patch_size"]) || +pick(result, ["patch_size"]) || null;
  return {
    model,
    heads,
    rows,
    cols,
    dim,
    patchSize,
    attention: attention.data, // [heads, rows * cols]
    mean: headMean(attention.data, heads, patches), // [rows * cols]
    features: features.data, // [rows * cols, dim]
    originalSize: asSize(pick(result, ["original_size", "image_size", "input_size"])),
    processedSize: asSize(pick(result, ["processed_size", "resized_size", "model_input_size"])),
  };
}

/**
 * The rectangle of the displayed image, in fractions of its width and height, that the patch grid
 * covers. With crop=none the service resizes the whole image to patch multiples, so the grid
 * covers all of it; should a processed side not be a patch multiple, the grid covers the top-left
 * part (the bottom and right edges cut, as in the reference).
 */
function gridRect(view) {
  const processed = view.processedSize;
  if (processed && view.patchSize && processed.width && processed.height) {
    return {
      x: 0,
      y: 0,
      w: Math.min(1, (view.cols * view.patchSize) / processed.width),
      h: Math.min(1, (view.rows * view.patchSize) / processed.height),
    };
  }
  return { x: 0, y: 0, w: 1, h: 1 };
}

// ---------------------------------------------------------------------------------------------
// Drawing

function canvasSize(view, longest) {
  const width = state.image ? state.image.naturalWidth : view.cols;
  const height = state.image ? state.image.naturalHeight : view.rows;
  const scale = longest / Math.max(width, height);
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

function gridCanvas(rgba, rows, cols) {
  const canvas = document.createElement("canvas");
  canvas.width = cols;
  canvas.height = rows;
  canvas.getContext("2d").putImageData(new ImageData(rgba, cols, rows), 0, 0);
  return canvas;
}

function prepare(canvas, view, longest) {
  const [width, height] = canvasSize(view, longest);
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const context = canvas.getContext("2d");
  context.globalAlpha = 1;
  context.imageSmoothingEnabled = true;
  context.clearRect(0, 0, width, height);
  if (state.image) context.drawImage(state.image, 0, 0, width, height);
  else {
    context.fillStyle = "#000";
    context.fillRect(0, 0, width, height);
  }
  const rect = gridRect(view);
  return {
    context,
    box: { x: rect.x * width, y: rect.y * height, w: rect.w * width, h: rect.h * height },
  };
}

function drawHeatmap(canvas, view, values, longest) {
  const { context, box } = prepare(canvas, view, longest);
  context.imageSmoothingEnabled = $("smooth").checked;
  context.globalAlpha = state.image ? Number($("opacity").value) / 100 : 1;
  const colours = gridCanvas(heatmapRgba(values), view.rows, view.cols);
  context.drawImage(colours, box.x, box.y, box.w, box.h);
  context.globalAlpha = 1;
}

function drawMask(canvas, view, values, longest, fraction) {
  const mask = attentionMask(values, fraction);
  const { context, box } = prepare(canvas, view, longest);
  const { rows, cols } = view;
  const shade = new Uint8ClampedArray(rows * cols * 4);
  for (let i = 0; i < rows * cols; i += 1) {
    if (!mask[i]) shade[i * 4 + 3] = Math.round(255 * MASK_DIM_ALPHA);
  }
  context.imageSmoothingEnabled = false;
  context.drawImage(gridCanvas(shade, rows, cols), box.x, box.y, box.w, box.h);
  // Outline of the kept region: every cell edge between a kept and a dropped (or outside) cell.
  const cellW = box.w / cols;
  const cellH = box.h / rows;
  const kept = (r, c) => r >= 0 && r < rows && c >= 0 && c < cols && mask[r * cols + c] === 1;
  context.beginPath();
  for (let r = 0; r < rows; r += 1) {
    for (let c = 0; c < cols; c += 1) {
      if (!kept(r, c)) continue;
      const x = box.x + c * cellW;
      const y = box.y + r * cellH;
      if (!kept(r - 1, c)) { context.moveTo(x, y); context.lineTo(x + cellW, y); }
      if (!kept(r + 1, c)) { context.moveTo(x, y + cellH); context.lineTo(x + cellW, y + cellH); }
      if (!kept(r, c - 1)) { context.moveTo(x, y); context.lineTo(x, y + cellH); }
      if (!kept(r, c + 1)) { context.moveTo(x + cellW, y); context.lineTo(x + cellW, y + cellH); }
    }
  }
  context.strokeStyle = MASK_OUTLINE;
  context.lineWidth = Math.max(1.5, canvas.width / 320);
  context.stroke();
  let count = 0;
  for (const value of mask) count += value;
  return count;
}

function headPanels(count) {
  const container = $("heads");
  if (container.children.length !== count) {
    container.replaceChildren();
    for (let head = 0; head < count; head += 1) {
      const figure = document.createElement("figure");
      figure.className = "panel head";
      const frame = document.createElement("div");
      frame.className = "frame";
      const canvas = document.createElement("canvas");
      canvas.dataset.head = String(head);
      canvas.setAttribute("role", "img");
      frame.append(canvas);
      const caption = document.createElement("figcaption");
      figure.append(frame, caption);
      container.append(figure);
    }
  }
  return Array.from(container.querySelectorAll("canvas[data-head]"));
}

function renderAttention() {
  const view = state.view;
  if (!view) return;
  const fraction = Number($("threshold").value) / 100;
  const percent = `${Math.round(fraction * 100)}%`;
  const patches = view.rows * view.cols;
  const mode = document.querySelector('input[name="head-mode"]:checked').value;

  const meanCanvas = $("mean-canvas");
  drawHeatmap(meanCanvas, view, view.mean, MAIN_PANEL_SIZE);
  meanCanvas.setAttribute(
    "aria-label",
    `Mean attention of the ${view.heads} heads as a heatmap over the image`,
  );

  const maskCanvas = $("mask-canvas");
  const kept = drawMask(maskCanvas, view, view.mean, MAIN_PANEL_SIZE, fraction);
  $("mask-caption").textContent =
    `Mask of the mean (keeps ${percent} of mass: ${kept} of ${patches} patches)`;
  maskCanvas.setAttribute(
    "aria-label",
    `Mask of the mean attention keeping ${percent} of the attention mass: ` +
      `${kept} of ${patches} patches`,
  );

  headPanels(view.heads).forEach((canvas, head) => {
    const values = view.attention.subarray(head * patches, (head + 1) * patches);
    const caption = canvas.closest("figure").querySelector("figcaption");
    if (mode === "mask") {
      const count = drawMask(canvas, view, values, HEAD_PANEL_SIZE, fraction);
      caption.textContent = `Head ${head + 1}: ${count} patches hold ${percent}`;
      canvas.setAttribute(
        "aria-label",
        `Mask of head ${head + 1} keeping ${percent} of its attention mass`,
      );
    } else {
      drawHeatmap(canvas, view, values, HEAD_PANEL_SIZE);
      caption.textContent = `Head ${head + 1}`;
      canvas.setAttribute(
        "aria-label",
        `Attention of head ${head + 1} as a heatmap over the image`,
      );
    }
  });
}

function renderPca() {
  const view = state.view;
  if (!view) return;
  if (!state.pca) {
    const started = performance.now();
    const { rgba } = pcaRgb(view.features, view.rows * view.cols, view.dim);
    state.pca = { rgba, milliseconds: performance.now() - started };
  }
  $("timing-pca").textContent = `${state.pca.milliseconds.toFixed(0)} ms`;
  const canvas = $("pca-canvas");
  const scale = MAIN_PANEL_SIZE / Math.max(view.rows, view.cols);
  canvas.width = Math.round(view.cols * scale);
  canvas.height = Math.round(view.rows * scale);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = $("smooth").checked;
  const colours = gridCanvas(state.pca.rgba, view.rows, view.cols);
  context.drawImage(colours, 0, 0, canvas.width, canvas.height);
  canvas.setAttribute(
    "aria-label",
    `First three principal components of the ${view.rows * view.cols} patch features ` +
      "shown as red, green and blue",
  );
}

// ---------------------------------------------------------------------------------------------
// Controls

function wireControls() {
  const opacity = $("opacity");
  const threshold = $("threshold");
  const update = () => {
    $("opacity-value").textContent = `${opacity.value}%`;
    $("threshold-value").textContent = `${threshold.value}%`;
    renderAttention();
  };
  opacity.addEventListener("input", update);
  threshold.addEventListener("input", update);
  for (const radio of document.querySelectorAll('input[name="head-mode"]')) {
    radio.addEventListener("change", renderAttention);
  }
  $("smooth").addEventListener("change", () => {
    renderAttention();
    renderPca();
  });
  $("api-key-form").addEventListener("submit", (event) => {
    event.preventDefault(); // Enter in the key field retries with the new key
    if (state.file) analyse(state.file);
    else loadModelInfo();
  });
  $("retry").addEventListener("click", () => {
    if (state.file) analyse(state.file);
  });
}

function init() {
  document.querySelector(".colorbar").style.background = viridisGradient();
  wireInput();
  wireControls();
  loadModelInfo();
}

init();
