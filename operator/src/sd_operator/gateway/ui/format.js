// Pure helpers of the console: no DOM, no fetch. tests/browser/test_console.py imports this module in the
// browser and checks them directly.

// Every state the console shows has a symbol and a word, so it reads without colour (and in a screen reader).
const STATES = {
  Ready: ["✓", "ok"],
  Succeeded: ["✓", "ok"],
  Complete: ["✓", "ok"],
  done: ["✓", "ok"],
  Running: ["▶", "busy"],
  running: ["▶", "busy"],
  Evaluating: ["▶", "busy"],
  Publishing: ["▶", "busy"],
  Validating: ["…", "busy"],
  Loading: ["…", "busy"],
  Downloading: ["↓", "busy"],
  Pending: ["◷", "wait"],
  queued: ["◷", "wait"],
  Suspended: ["⏸", "wait"],
  ScaledToZero: ["⏾", "idle"],
  Degraded: ["!", "warn"],
  Failed: ["✗", "bad"],
  failed: ["✗", "bad"],
};

/** {symbol, word, tone} for a phase or state; tone only picks a colour, the word says it. */
export function stateLabel(state) {
  const word = state || "Unknown";
  const [symbol, tone] = STATES[word] || ["?", "wait"];
  return { symbol, word, tone };
}

/** "sd15 (ScaledToZero)": a model as the model select lists it. */
export function modelOptionLabel(model) {
  const name = model.model_name || model.title || model.filename;
  return `${name} (${model.state || "Unknown"})`;
}

/** 0.4 -> "0.4 s", 75 -> "1 min 15 s", 7300 -> "2 h 1 min"; null -> "—". */
export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  if (seconds < 10) return `${Math.max(0, Math.round(seconds * 10) / 10)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** 0.4567 -> "46 %". */
export function formatPercent(fraction) {
  if (fraction === null || fraction === undefined || !Number.isFinite(fraction)) return "—";
  return `${Math.round(Math.min(1, Math.max(0, fraction)) * 100)} %`;
}

/** What a person reads while a request waits: the queue position, or how far the render is. */
export function describeWait(status, elapsedSeconds) {
  if (!status || status.state === "unknown") return `Sent, waiting for the gateway (${formatSeconds(elapsedSeconds)})`;
  if (status.state === "queued") {
    if (status.position) {
      const others = status.queueDepth > 1 ? ` of ${status.queueDepth} waiting` : "";
      return `Queued: position ${status.position}${others} (${formatSeconds(elapsedSeconds)})`;
    }
    return `Queued (${formatSeconds(elapsedSeconds)})`;
  }
  if (status.state === "running") {
    const progress = status.progress === null || status.progress === undefined ? "" : `: ${formatPercent(status.progress)}`;
    const eta = status.etaSeconds ? `, about ${formatSeconds(status.etaSeconds)} left` : "";
    return `Rendering${progress}${eta}`;
  }
  if (status.state === "done") return "Done, receiving the image";
  if (status.state === "failed") return "The request failed";
  return `Waiting (${formatSeconds(elapsedSeconds)})`;
}

/** "Outputs 25–48 of 50" and whether the previous and next pages exist. */
export function pageInfo(offset, limit, total) {
  const first = total === 0 ? 0 : offset + 1;
  const last = Math.min(offset + limit, total);
  return {
    text: total === 0 ? "No outputs yet" : `Outputs ${first}-${last} of ${total}`,
    page: Math.floor(offset / limit) + 1,
    pages: Math.max(1, Math.ceil(total / limit)),
    hasPrev: offset > 0,
    hasNext: offset + limit < total,
  };
}

/** "12 of 50 done, 1 failed, 2 running (24 %)". */
export function batchSummary(batch) {
  const total = batch.total || 0;
  const parts = [`${batch.succeeded || 0} of ${total} done`];
  if (batch.failed) parts.push(`${batch.failed} failed`);
  if (batch.running) parts.push(`${batch.running} running`);
  const fraction = batch.progress ?? (total ? (batch.succeeded || 0) / total : null);
  return `${parts.join(", ")} (${formatPercent(fraction)})`;
}

function number(text) {
  if (text === "" || text === null || text === undefined) return undefined;
  const value = Number(text);
  return Number.isFinite(value) ? value : undefined;
}

/** The POST /v1/generate body from the form's values (strings, as inputs hold them). Empty fields are left
 * out, so the preset's value, then the gateway's default, applies. */
export function buildGenerateRequest(values) {
  const body = { prompt: values.prompt || "" };
  if (values.model) body.model = values.model;
  if (values.preset) body.preset = values.preset;
  if (values.negative_prompt) body.negative_prompt = values.negative_prompt;
  for (const key of ["width", "height", "steps", "cfg_scale"]) {
    const value = number(values[key]);
    if (value !== undefined) body[key] = value;
  }
  const seed = number(values.seed);
  body.seed = seed === undefined ? -1 : seed;
  if (values.lora) {
    body.lora = values.lora;
    const weight = number(values.lora_weight);
    if (weight !== undefined) body.lora_weight = weight;
  }
  if (values.controlnet && values.controlnet.image) {
    const unit = { type: values.controlnet.type, image: values.controlnet.image };
    if (values.controlnet.module) unit.module = values.controlnet.module;
    if (values.controlnet.model) unit.model = values.controlnet.model;
    body.controlnet = unit;
  }
  return body;
}

/** The gateway's error bodies ({error, detail}) or anything else as one readable line. */
export function errorText(status, body) {
  if (body && typeof body === "object") {
    const detail = body.detail ?? body.errors ?? body.error;
    if (typeof detail === "string" && detail) return `${body.error ? `${body.error}: ` : ""}${detail}`;
    if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  }
  if (typeof body === "string" && body.trim()) return `HTTP ${status}: ${body.trim().slice(0, 300)}`;
  return `HTTP ${status}`;
}

/** The newest entry first, at most `limit` entries. */
export function addToHistory(history, entry, limit = 20) {
  return [entry, ...(Array.isArray(history) ? history : [])].slice(0, limit);
}

/** The value of one field ("Model", "Seed", ...) in an A1111 infotext's parameter line. */
export function infotextField(infotext, name) {
  const lines = (infotext || "").split("\n");
  const params = lines[lines.length - 1];
  const found = new RegExp(`(?:^|, )${name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: ("(?:[^"\\\\]|\\\\.)*"|[^,]*)`).exec(params);
  return found ? found[1] : null;
}

/** A random RFC 4122 version 4 id; crypto.randomUUID exists only on secure origins (not plain http). */
export function requestId(random = (n) => crypto.getRandomValues(new Uint8Array(n))) {
  const b = random(16);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** What a view says about the gateway's watch of its objects ({up, staleSeconds, reason}); "" when all is well. */
export function watchNote(watch, what) {
  if (!watch || (watch.up && !(watch.staleSeconds > 0))) return "";
  if (watch.reason) return `⚠ The gateway does not watch ${what}: ${watch.reason}.`;
  const since = watch.staleSeconds > 0 ? ` for ${formatSeconds(watch.staleSeconds)}` : "";
  return `⚠ Stale: the gateway has not heard from the Kubernetes API about ${what}${since}; this may be out of date.`;
}
