// Training: each LoRAJob with epoch, step and loss, and its evaluation grid (prompts × LoRA weights) from the
// evaluation GenerationBatch's outputs.
import * as api from "./api.js";
import { badge, fill, h, table } from "./dom.js";
import { CardListView } from "./cardlist.js";
import { openViewer } from "./viewer.js";

function of(value, total) {
  if (value === null || value === undefined) return "—";
  return total ? `${value} of ${total}` : String(value);
}

function formatLoss(loss) {
  return typeof loss === "number" ? loss.toPrecision(4) : "—";
}

export class TrainingView extends CardListView {
  constructor() {
    super({ prefix: "training", path: "/v1/lorajobs", kind: "LoRAJobs", one: "LoRAJob" });
  }

  card(_job, key) {
    const parts = {
      badge: h("span"),
      stats: h("dl", { class: "stats" }),
      progress: h("progress", { max: "1", "aria-label": `Training progress of ${key}` }),
      message: h("p", { class: "message" }),
      outputs: h("p", { class: "hint" }),
      toggle: h("button", { type: "button", "aria-expanded": "false", hidden: true }, "Show evaluation grid"),
      slot: h("div"),
    };
    const entry = { key, parts, urls: [], job: null, card: null };
    parts.toggle.addEventListener("click", () => this.toggle(entry));
    entry.card = h(
      "article",
      { class: "card lorajob", "data-lorajob": key },
      h("h3", {}, key, " ", parts.badge),
      parts.stats,
      parts.progress,
      parts.message,
      parts.outputs,
      h("div", { class: "actions" }, parts.toggle),
      parts.slot,
    );
    return entry;
  }

  update(entry, job) {
    entry.job = job;
    const { parts } = entry;
    fill(parts.badge, badge(job.phase));
    fill(
      parts.stats,
      h("div", {}, h("dt", {}, "Epoch"), h("dd", {}, of(job.epoch, job.totalEpochs))),
      h("div", {}, h("dt", {}, "Step"), h("dd", {}, of(job.step, job.totalSteps))),
      h("div", {}, h("dt", {}, "Loss"), h("dd", {}, formatLoss(job.loss))),
    );
    parts.progress.max = Math.max(job.totalSteps || 0, 1);
    parts.progress.value = job.step || 0;
    parts.message.textContent = job.message || "";
    parts.message.hidden = !job.message;
    const outputs = (job.outputs || []).map((o) => (typeof o === "string" ? o : o.name || o.path || JSON.stringify(o)));
    parts.outputs.textContent = outputs.length ? `Outputs: ${outputs.join(", ")}` : "";
    parts.toggle.hidden = !job.evaluationBatch;
  }

  release(entry) {
    for (const url of entry.urls) URL.revokeObjectURL(url);
    entry.urls = [];
  }

  async toggle(entry) {
    const { parts } = entry;
    if (parts.toggle.getAttribute("aria-expanded") === "true") {
      this.release(entry);
      fill(parts.slot);
      parts.toggle.setAttribute("aria-expanded", "false");
      parts.toggle.textContent = "Show evaluation grid";
      return;
    }
    parts.toggle.setAttribute("aria-expanded", "true");
    parts.toggle.textContent = "Hide evaluation grid";
    fill(parts.slot, h("p", { role: "status" }, "Loading the evaluation grid…"));
    const [namespace, name] = entry.key.split("/");
    let grid;
    try {
      grid = await api.get(`/v1/lorajobs/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}/evaluation`);
    } catch (e) {
      fill(parts.slot, h("p", { class: "error", role: "alert" }, `Could not load the evaluation grid: ${e.message}`));
      return;
    }
    const images = [];
    const rows = (grid.prompts || []).map((prompt, p) =>
      h(
        "tr",
        {},
        h("th", { scope: "row" }, prompt),
        (grid.weights || []).map((weight, w) => {
          const cell = grid.cells?.[p]?.[w];
          if (!cell) return h("td", {}, "not rendered yet");
          const label = `${prompt} at weight ${weight}, seed ${cell.seed}`;
          const image = h("img", { alt: label });
          images.push([cell, image]);
          return h(
            "td",
            {},
            h(
              "button",
              { type: "button", class: "thumb", onclick: () => this.open(entry, cell, label) },
              image,
            ),
          );
        }),
      ),
    );
    fill(
      parts.slot,
      h("p", { class: "hint" }, `From GenerationBatch ${grid.batch}: each row a prompt, each column a LoRA weight.`),
      table(`Evaluation of ${entry.key}`, ["Prompt", ...(grid.weights || []).map((w) => `weight ${w}`)], rows),
    );
    await Promise.all(
      images.map(async ([cell, image]) => {
        try {
          const url = await api.blobUrl(cell.thumbnail || cell.image);
          entry.urls.push(url);
          image.src = url;
        } catch {
          image.replaceWith(h("span", { class: "missing" }, "(image unavailable)"));
        }
      }),
    );
  }

  async open(entry, cell, label) {
    try {
      const url = await api.blobUrl(cell.image);
      entry.urls.push(url);
      openViewer({ title: label, src: url, filename: `${entry.key.replace("/", "-")}-${cell.seed}.png` });
    } catch {
      // the thumbnail stays; nothing else to show
    }
  }
}
