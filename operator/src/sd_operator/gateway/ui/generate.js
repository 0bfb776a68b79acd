// Generate: the form (models, presets, LoRAs and ControlNet lists from the gateway), the wait (queue position
// and progress from GET /v1/requests/{id}), the image with its PNG info, and this browser's history.
import * as api from "./api.js";
import { fill, h } from "./dom.js";
import {
  addToHistory,
  buildGenerateRequest,
  describeWait,
  infotextField,
  modelOptionLabel,
  requestId,
} from "./format.js";
import { Poller } from "./poller.js";
import { openViewer, setUpViewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const HISTORY = "sd-console-history";
const POLL_MS = 500;
const THUMB_PX = 128;
const MODELS_MS = 5000; // the model select's states (Ready, ScaledToZero, ...) follow the fleet

function readHistory() {
  try {
    const list = JSON.parse(localStorage.getItem(HISTORY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function writeHistory(list) {
  // A full local storage drops the oldest entries rather than the newest.
  for (let keep = list.length; keep >= 0; keep--) {
    try {
      localStorage.setItem(HISTORY, JSON.stringify(list.slice(0, keep)));
      return;
    } catch {
      // QuotaExceededError: try with one entry fewer
    }
  }
}

/** A small JPEG copy of an image (data: URL) for the history. */
function thumbnail(src) {
  return new Promise((resolve) => {
    const image = new Image();
    image.onload = () => {
      const scale = Math.min(1, THUMB_PX / Math.max(image.width, image.height));
      const canvas = document.createElement("canvas");
      canvas.width = Math.max(1, Math.round(image.width * scale));
      canvas.height = Math.max(1, Math.round(image.height * scale));
      canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
      resolve(canvas.toDataURL("image/jpeg", 0.8));
    };
    image.onerror = () => resolve(null);
    image.src = src;
  });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function option(value, text) {
  return h("option", { value }, text);
}

export class GenerateView {
  constructor() {
    this.presets = {};
    this.pending = null;
    this.downloadUrl = null;
    this.modelChoices = null;
    this.listSeq = 0;
    this.cnSeq = 0;
    this.pollsRequests = true; // false once the gateway shows it has no GET /v1/requests/{id}
    this.models = new Poller(() => this.refreshModels(), MODELS_MS);
    setUpViewer();
    $("generate-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    $("g-cancel").addEventListener("click", () => this.pending?.abort());
    $("g-model").addEventListener("change", () => this.loadModelLists());
    $("g-preset").addEventListener("change", () => this.showPreset());
    $("g-cn-on").addEventListener("change", () => {
      $("g-cn").hidden = !$("g-cn-on").checked;
      if ($("g-cn-on").checked) this.loadControlNetLists();
    });
    $("history-clear").addEventListener("click", () => {
      writeHistory([]);
      this.renderHistory();
    });
    this.renderHistory();
  }

  start() {
    this.models.start();
  }

  stop() {
    this.models.stop();
  }

  async refreshModels() {
    // Not while the select is in use: replacing its options would close it under the person's hand.
    if (document.activeElement === $("g-model")) return;
    try {
      this.fillModels(await api.get("/v1/models"));
    } catch {
      // the next round tries again; a refused key is handled by api.js
    }
  }

  /** Fills the selects; `models` is /v1/models when the key check already fetched it. */
  async load(models) {
    try {
      this.fillModels(models || (await api.get("/v1/models")));
    } catch (e) {
      this.showError(`Models: ${e.message}`);
    }
    try {
      this.presets = (await api.get("/v1/presets")).presets || {};
      const select = $("g-preset");
      fill(select, option("", "None"), Object.keys(this.presets).sort().map((name) => option(name, name)));
    } catch (e) {
      this.showError(`Presets: ${e.message}`);
    }
    await this.loadModelLists();
  }

  fillModels(models) {
    const select = $("g-model");
    const choices = (models || []).map((m) => [m.filename || m.title, modelOptionLabel(m)]);
    const seen = JSON.stringify(choices);
    if (seen === this.modelChoices) return; // unchanged: leave the select alone
    this.modelChoices = seen;
    const before = select.value;
    if (choices.length === 0) fill(select, option("", "No model is served"));
    else fill(select, choices.map(([value, label]) => option(value, label)));
    if ([...select.options].some((o) => o.value === before)) select.value = before;
    if (before && select.value !== before) this.loadModelLists(); // the chosen model left the fleet
  }

  showPreset() {
    const preset = this.presets[$("g-preset").value];
    const hint = $("g-preset-hint");
    hint.textContent = preset
      ? `${preset.description || ""} Defaults: ${preset.width ?? 512}×${preset.height ?? 512}, ${preset.steps ?? 20} steps, CFG ${preset.cfg_scale ?? 7}.`
      : "";
    $("g-width").placeholder = preset?.width ?? 512;
    $("g-height").placeholder = preset?.height ?? 512;
    $("g-steps").placeholder = preset?.steps ?? 20;
    $("g-cfg").placeholder = preset?.cfg_scale ?? 7;
  }

  /** LoRAs (and ControlNet lists, when shown) of the chosen model's instances. */
  async loadModelLists() {
    this.showPreset();
    const seq = ++this.listSeq; // a slower answer for a model chosen before must not win
    const model = $("g-model").value;
    const select = $("g-lora");
    try {
      const loras = model ? await api.get(`/v1/loras?model=${encodeURIComponent(model)}`) : [];
      if (seq !== this.listSeq) return;
      const before = select.value; // read after the wait: the person may have chosen meanwhile
      fill(select, option("", "None"), (loras || []).map((l) => option(l.name, l.alias && l.alias !== l.name ? `${l.name} (${l.alias})` : l.name)));
      if ([...select.options].some((o) => o.value === before)) select.value = before;
    } catch (e) {
      // A model whose instances are not up cannot list its LoRAs: generate without one, or wait.
      if (seq !== this.listSeq) return;
      fill(select, option("", `None (LoRAs unavailable: ${e.message})`));
    }
    if ($("g-cn-on").checked) await this.loadControlNetLists();
  }

  async loadControlNetLists() {
    const seq = ++this.cnSeq;
    const model = encodeURIComponent($("g-model").value);
    const hint = $("g-cn-hint");
    hint.textContent = "";
    for (const [id, path, key] of [
      ["g-cn-module", "/controlnet/module_list", "module_list"],
      ["g-cn-model", "/controlnet/model_list", "model_list"],
    ]) {
      const select = $(id);
      try {
        const answer = await api.get(`${path}?model=${model}`);
        if (seq !== this.cnSeq) return;
        const before = select.value;
        fill(select, option("", "Recommended for the type"), (answer[key] || []).map((x) => option(x, x)));
        if ([...select.options].some((o) => o.value === before)) select.value = before;
      } catch (e) {
        // Without the gateway's ControlNet proxies the recommended module and model still work.
        if (seq !== this.cnSeq) return;
        fill(select, option("", "Recommended for the type"));
        hint.textContent = `The gateway did not list ControlNet choices (${e.message}); the recommended ones are used.`;
      }
    }
  }

  showError(message) {
    const error = $("g-error");
    error.textContent = message;
    error.hidden = !message;
  }

  busy(on) {
    $("g-submit").disabled = on;
    $("g-cancel").hidden = !on;
    $("g-progress").hidden = !on;
    if (on) $("g-progress").removeAttribute("value");
  }

  async values() {
    const values = Object.fromEntries(new FormData($("generate-form")).entries());
    if ($("g-cn-on").checked) {
      const file = $("g-cn-image").files[0];
      if (!file) throw new Error("Choose a control image, or switch the ControlNet unit off.");
      values.controlnet = {
        type: $("g-cn-type").value,
        image: await readFile(file),
        module: $("g-cn-module").value,
        model: $("g-cn-model").value,
      };
    }
    return values;
  }

  async submit() {
    this.showError("");
    let body;
    try {
      body = buildGenerateRequest(await this.values());
    } catch (e) {
      this.showError(e.message);
      return;
    }
    if (!body.prompt.trim()) {
      this.showError("Write a prompt first.");
      $("g-prompt").focus();
      return;
    }
    const id = requestId();
    const controller = new AbortController();
    this.pending = controller;
    this.busy(true);
    const started = performance.now();
    $("g-status").textContent = describeWait(null, 0);
    const polling = this.poll(id, started, controller.signal);
    try {
      const answer = await api.post("/v1/generate", body, {
        signal: controller.signal,
        extraHeaders: { "X-Request-Id": id },
      });
      controller.abort(); // ends the polling
      await polling;
      await this.showResult(answer, body);
    } catch (e) {
      controller.abort();
      await polling;
      if (e.name === "AbortError") {
        $("g-status").textContent = "Cancelled.";
      } else {
        $("g-status").textContent = "The request failed.";
        this.showError(e.message);
      }
    } finally {
      this.pending = null;
      this.busy(false);
    }
  }

  /** Queue position and progress until the answer comes (or the request is cancelled). */
  async poll(id, started, signal) {
    const status = $("g-status");
    const bar = $("g-progress");
    const wait = () => new Promise((resolve) => setTimeout(resolve, POLL_MS));
    while (!signal.aborted) {
      await wait();
      if (signal.aborted) return;
      const elapsed = (performance.now() - started) / 1000;
      let state = null;
      if (this.pollsRequests) {
        try {
          state = await api.get(`/v1/requests/${encodeURIComponent(id)}`, { signal });
        } catch (e) {
          if (e.name === "AbortError") return;
          if (e.status === 404 && !(e.body && e.body.state)) this.pollsRequests = false; // an older gateway
        }
      }
      if (signal.aborted) return;
      status.textContent = describeWait(state, elapsed);
      if (state && state.state === "running" && typeof state.progress === "number") bar.value = state.progress;
      else bar.removeAttribute("value");
    }
  }

  async showResult(answer, body) {
    const images = answer.images || [];
    if (images.length === 0) {
      this.showError("The gateway answered without an image.");
      return;
    }
    const src = `data:image/png;base64,${images[0]}`;
    let info = null;
    try {
      info = JSON.parse(answer.info || "null");
    } catch {
      info = null;
    }
    // The PNG's own parameters, read back by an instance (what the WebUI's PNG Info tab shows).
    let infotext = info?.infotexts?.[0] || "";
    let items = {};
    try {
      const png = await api.post("/sdapi/v1/png-info", { image: src });
      infotext = png.info || infotext;
      items = png.items || {};
    } catch {
      // keep the infotext the generation answered with
    }
    const model = infotextField(infotext, "Model") || info?.sd_model_name || body.model || "";
    const seed = infotextField(infotext, "Seed") || info?.seed || "";
    $("g-image").src = src;
    $("g-image").alt = `Generated: ${body.prompt}`;
    $("g-caption").textContent = `${model} · seed ${seed}${images.length > 1 ? ` · 1 of ${images.length}` : ""}`;
    $("g-result").hidden = false;
    if (this.downloadUrl) URL.revokeObjectURL(this.downloadUrl);
    const bytes = Uint8Array.from(atob(images[0]), (c) => c.charCodeAt(0));
    this.downloadUrl = URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
    const download = $("g-download");
    download.href = this.downloadUrl;
    download.download = `${model || "image"}-${seed || "0"}.png`;
    download.hidden = false;
    const fields = ["Model", "Model hash", "Seed", "Steps", "Sampler", "CFG scale", "Size", "Lora hashes"];
    fill(
      $("g-param-list"),
      fields
        .map((name) => [name, infotextField(infotext, name)])
        .filter(([, value]) => value !== null)
        .map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]),
    );
    $("g-infotext").textContent = infotext;
    $("g-params").hidden = !infotext;
    $("g-params").dataset.model = items["sd-emulator-model"] || model;
    $("g-status").textContent = `Done: ${model}, seed ${seed}.`;
    const entry = {
      when: new Date().toISOString(),
      model,
      seed,
      prompt: body.prompt,
      infotext,
      thumb: await thumbnail(src),
    };
    writeHistory(addToHistory(readHistory(), entry));
    this.renderHistory();
  }

  renderHistory() {
    const list = readHistory();
    fill(
      $("history"),
      list.length === 0
        ? h("li", { class: "empty" }, "No images yet.")
        : list.map((entry, i) =>
            h(
              "li",
              {},
              h(
                "button",
                {
                  type: "button",
                  class: "thumb",
                  "aria-label": `Image ${i + 1}: ${entry.prompt} (${entry.model}, seed ${entry.seed})`,
                  onclick: () =>
                    openViewer({
                      title: `${entry.prompt} — ${entry.model}, seed ${entry.seed}`,
                      src: entry.thumb,
                      info: `${entry.infotext}\n\n(a small copy; generated ${new Date(entry.when).toLocaleString()})`,
                      filename: `${entry.model}-${entry.seed}-small.jpg`,
                    }),
                },
                entry.thumb ? h("img", { src: entry.thumb, alt: "" }) : "(no preview)",
              ),
            ),
          ),
    );
  }
}
