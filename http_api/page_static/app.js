/* The browser test page: send images to v3/analyze and show what comes back.
 *
 * Plain JavaScript, no dependencies. URLs are relative to the page so it works behind a proxy
 * under a path prefix. Images are captioned one at a time, in the order they were given, so a
 * large drop does not flood the service's queue.
 */
"use strict";

(function () {
  const ANALYZE = "v3/analyze";
  const HEALTH = "health";
  const REQUEST_TIMEOUT_MS = 120000;
  const HEALTH_TIMEOUT_MS = 5000;

  const $ = (id) => document.getElementById(id);
  const queue = [];
  let busy = false;

  // ------------------------------------------------------------------ options

  /** Query parameters for the options the user changed from the reference defaults. */
  function optionParams() {
    const params = new URLSearchParams();
    const form = $("options-form");
    for (const el of form.elements) {
      if (!el.name || el.disabled) continue;
      if (el.type === "checkbox") {
        if (el.checked !== el.defaultChecked) params.set(el.name, el.checked ? "true" : "false");
      } else if (el.value.trim() !== el.defaultValue) {
        if (el.value.trim() !== "") params.set(el.name, el.value.trim());
      }
    }
    return params;
  }

  function syncOptions() {
    const maxLen = $("max_length");
    const minLen = $("min_length");
    const ceiling = Number(maxLen.value);
    if (Number.isInteger(ceiling) && ceiling >= 1) {
      minLen.max = String(ceiling);
      if (Number(minLen.value) > ceiling) minLen.value = String(ceiling);
    }
    $("top_p").disabled = !$("sampling").checked;
    const changed = optionParams().toString();
    $("options-summary").textContent = changed ? "(" + changed.replace(/&/g, ", ") + ")" : "(reference defaults)";
  }

  /** The options' query string, or null after showing the browser's message for a bad field. */
  function validOptions() {
    const form = $("options-form");
    if (form.checkValidity()) return optionParams();
    $("options").open = true;
    form.reportValidity();
    return null;
  }

  // ------------------------------------------------------------------ cards

  function newCard(sourceText, previewSrc, requestText) {
    const node = $("card-template").content.firstElementChild.cloneNode(true);
    node.querySelector(".source").textContent = sourceText;
    node.querySelector(".request").textContent = requestText;
    const img = node.querySelector(".preview img");
    const fallback = node.querySelector(".preview-fallback");
    img.alt = "Preview of " + sourceText;
    img.addEventListener("error", () => {
      img.hidden = true;
      fallback.hidden = false;
    });
    img.src = previewSrc;
    $("results").prepend(node);
    $("empty").hidden = true;
    $("clear").disabled = false;
    return node;
  }

  function chipList(mappings, index) {
    const list = document.createElement("ul");
    list.className = "chips";
    list.setAttribute("aria-label", "Emoji for caption " + (index + 1));
    for (const m of mappings) {
      const chip = document.createElement("li");
      chip.className = "chip";
      const emoji = document.createElement("span");
      emoji.className = "emoji";
      emoji.textContent = m.emoji;
      const word = document.createElement("span");
      word.className = "word";
      word.textContent = String(m.word).replace(/_/g, " ");
      chip.append(emoji, word);
      list.append(chip);
    }
    return list;
  }

  function showSuccess(card, body, roundTripMs) {
    const captions = card.querySelector(".captions");
    (body.predictions || []).forEach((pred, i) => {
      const item = document.createElement("li");
      const text = document.createElement("p");
      text.className = "caption";
      text.textContent = pred.text;
      item.append(text);
      if (pred.shiny) {
        const shiny = document.createElement("span");
        shiny.className = "badge shiny";
        shiny.textContent = "✨ shiny";
        text.append(" ", shiny);
      }
      if (Array.isArray(pred.emoji_mappings) && pred.emoji_mappings.length) {
        item.append(chipList(pred.emoji_mappings, i));
      }
      captions.append(item);
    });
    if (captions.children.length > 1) captions.classList.add("numbered");
    const meta = body.metadata || {};
    const cached = meta.cached === true;
    const metaLine = card.querySelector(".meta");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = formatSeconds(meta.processing_time) + " on the server, " +
      formatSeconds(roundTripMs / 1000) + " round trip";
    const badge = document.createElement("span");
    badge.className = "badge " + (cached ? "cached" : "fresh");
    badge.textContent = cached ? "from cache" : "computed";
    metaLine.append(time, " ", badge);
    setState(card, "done", cached ? "Done (from cache)" : "Done");
  }

  function showError(card, message) {
    const error = card.querySelector(".error");
    error.textContent = message;
    error.hidden = false;
    setState(card, "error", "Failed");
  }

  function setState(card, state, statusText) {
    card.dataset.state = state;
    card.querySelector(".status").textContent = statusText;
  }

  function formatSeconds(value) {
    return typeof value === "number" && isFinite(value) ? value.toFixed(3) + " s" : "? s";
  }

  // ------------------------------------------------------------------ requests

  /** A readable message for a failed response: the envelope's error.message when there is one. */
  async function errorMessage(resp) {
    let message = "";
    try {
      const body = await resp.json();
      if (body && body.error && typeof body.error.message === "string") message = body.error.message;
    } catch (_) {
      /* not JSON: a proxy's HTML page, for example */
    }
    if (!message) message = resp.statusText || "Request failed";
    let text = "Error " + resp.status + ": " + message;
    const retry = resp.headers.get("Retry-After");
    if (retry) text += " (retry in " + retry + " s)";
    return text;
  }

  async function send(job) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    const started = performance.now();
    try {
      const resp = await fetch(job.url, {
        method: job.body ? "POST" : "GET",
        body: job.body,
        signal: controller.signal,
        headers: { Accept: "application/json" },
      });
      if (!resp.ok) {
        showError(job.card, await errorMessage(resp));
        return;
      }
      const body = await resp.json();
      if (body.status !== "success") {
        showError(job.card, "Unexpected answer: status " + JSON.stringify(body.status));
        return;
      }
      showSuccess(job.card, body, performance.now() - started);
    } catch (err) {
      const message = err && err.name === "AbortError"
        ? "No answer within " + REQUEST_TIMEOUT_MS / 1000 + " s"
        : "Could not reach the service (" + (err && err.message ? err.message : err) + ")";
      showError(job.card, message);
    } finally {
      clearTimeout(timer);
    }
  }

  async function drain() {
    if (busy) return;
    busy = true;
    try {
      while (queue.length) await send(queue.shift());
    } finally {
      busy = false;
    }
  }

  function enqueue(job) {
    queue.push(job);
    drain();
  }

  function analyzeUrl(params) {
    const query = params.toString();
    return query ? ANALYZE + "?" + query : ANALYZE;
  }

  function addFiles(files) {
    const params = validOptions();
    if (params === null) return;
    for (const file of files) {
      const url = analyzeUrl(params);
      const card = newCard(file.name || "pasted image", URL.createObjectURL(file), "POST " + url);
      const body = new FormData();
      body.append("file", file, file.name || "pasted.png");
      enqueue({ url, body, card });
    }
  }

  function addUrl(imageUrl) {
    const params = validOptions();
    if (params === null) return;
    params.set("url", imageUrl);
    const url = analyzeUrl(params);
    const card = newCard(imageUrl, imageUrl, "GET " + url);
    enqueue({ url, body: null, card });
  }

  // ------------------------------------------------------------------ health

  async function checkHealth() {
    const status = $("model-status");
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), HEALTH_TIMEOUT_MS);
    try {
      const resp = await fetch(HEALTH, { signal: controller.signal, cache: "no-store" });
      const body = await resp.json();
      const state = resp.ok ? "ready" : String(body.status || resp.status);
      status.dataset.state = resp.ok ? "ready" : "busy";
      const model = body.model || {};
      const about = [model.arch, model.precision].filter(Boolean).join(", ");
      const named = model.name ? " · " + model.name + (about ? " (" + about + ")" : "") : "";
      status.textContent = resp.ok
        ? "Model " + (body.model_status || "ready") + named
        : "Model " + state;
      if (!resp.ok) setTimeout(checkHealth, 2000);
    } catch (_) {
      status.dataset.state = "down";
      status.textContent = "Service unreachable";
    } finally {
      clearTimeout(timer);
    }
  }

  // ------------------------------------------------------------------ wiring

  function onDrop(event) {
    event.preventDefault();
    $("file-form").classList.remove("dragging");
    const dt = event.dataTransfer;
    if (!dt) return;
    if (dt.files && dt.files.length) {
      addFiles(Array.from(dt.files));
      return;
    }
    const uri = (dt.getData("text/uri-list") || dt.getData("text/plain") || "").split("\n")[0].trim();
    if (/^https?:\/\//i.test(uri)) addUrl(uri);
  }

  function onPaste(event) {
    const target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;
    const files = Array.from((event.clipboardData && event.clipboardData.files) || []);
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  }

  function clearResults() {
    for (const img of $("results").querySelectorAll(".preview img")) {
      if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    }
    $("results").replaceChildren();
    $("empty").hidden = false;
    $("clear").disabled = true;
  }

  function init() {
    const files = $("files");
    files.addEventListener("change", () => {
      addFiles(Array.from(files.files));
      files.value = "";
    });
    const zone = $("file-form");
    zone.addEventListener("submit", (e) => e.preventDefault());
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", onDrop);
    document.addEventListener("paste", onPaste);
    $("url-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const input = $("url");
      if (!input.reportValidity()) return;
      addUrl(input.value.trim());
    });
    const options = $("options-form");
    options.addEventListener("input", syncOptions);
    options.addEventListener("change", syncOptions);
    options.addEventListener("submit", (e) => e.preventDefault());
    options.addEventListener("reset", () => setTimeout(syncOptions, 0));
    $("clear").addEventListener("click", clearResults);
    syncOptions();
    checkHealth();
    document.documentElement.dataset.ready = "true";
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
