// Batches: each GenerationBatch with a progress bar and numbers, and a paged gallery of its outputs
// (24 thumbnails a page, fetched with the key and shown through blob: URLs).
import * as api from "./api.js";
import { badge, fill, h } from "./dom.js";
import { CardListView } from "./cardlist.js";
import { batchSummary, pageInfo } from "./format.js";
import { openViewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
export const PAGE = 24;

/** A page of thumbnails whose blob: URLs are released when the page changes. */
export class Gallery {
  constructor(path, label) {
    this.path = path; // /v1/batches/{namespace}/{name}/outputs
    this.label = label;
    this.offset = 0;
    this.urls = [];
    this.status = h("p", { class: "pager-status", role: "status" });
    this.prev = h("button", { type: "button", onclick: () => this.go(this.offset - PAGE) }, "← Previous page");
    this.next = h("button", { type: "button", onclick: () => this.go(this.offset + PAGE) }, "Next page →");
    this.grid = h("ul", { class: "thumbs gallery", "aria-label": `Outputs of ${label}` });
    this.element = h(
      "div",
      { class: "gallery-box" },
      h("div", { class: "pager" }, this.prev, this.status, this.next),
      this.grid,
    );
  }

  release() {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
  }

  async go(offset) {
    const wanted = Math.max(0, offset);
    this.prev.disabled = true;
    this.next.disabled = true;
    this.status.textContent = "Loading…";
    let page;
    try {
      page = await api.get(`${this.path}?offset=${wanted}&limit=${PAGE}`);
    } catch (e) {
      this.status.textContent = `Could not load the outputs: ${e.message}`;
      this.prev.disabled = this.offset === 0;
      this.next.disabled = false;
      return;
    }
    this.offset = page.offset ?? wanted;
    this.release();
    const info = pageInfo(this.offset, page.limit || PAGE, page.total || 0);
    const items = page.items || [];
    const cells = items.map((item) => {
      const image = h("img", { alt: `Output ${item.index}, seed ${item.seed}: ${item.prompt || ""}` });
      const button = h(
        "button",
        { type: "button", class: "thumb", "data-index": String(item.index), onclick: () => this.open(item) },
        image,
      );
      return { item, image, li: h("li", {}, h("figure", {}, button, h("figcaption", {}, `#${item.index} · seed ${item.seed}`))) };
    });
    fill(this.grid, cells.length ? cells.map((c) => c.li) : h("li", { class: "empty" }, "No outputs yet."));
    this.status.textContent = `${info.text} (page ${info.page} of ${info.pages})`;
    this.prev.disabled = !info.hasPrev;
    this.next.disabled = !info.hasNext;
    await Promise.all(
      cells.map(async ({ item, image }) => {
        try {
          const url = await api.blobUrl(item.thumbnail || item.image);
          this.urls.push(url);
          image.src = url;
        } catch {
          image.replaceWith(h("span", { class: "missing" }, "(image unavailable)"));
        }
      }),
    );
    this.grid.dataset.loaded = String(this.offset);
  }

  async open(item) {
    try {
      const url = await api.blobUrl(item.image);
      this.urls.push(url);
      openViewer({
        title: `${this.label} #${item.index}, seed ${item.seed}`,
        src: url,
        info: [item.prompt, item.parameters ? JSON.stringify(item.parameters, null, 2) : ""].filter(Boolean).join("\n\n"),
        filename: `${this.label.replace("/", "-")}-${item.index}-${item.seed}.png`,
      });
    } catch (e) {
      this.status.textContent = `Could not load the image: ${e.message}`;
    }
  }
}

export class BatchesView extends CardListView {
  constructor() {
    super({ prefix: "batches", path: "/v1/batches", kind: "GenerationBatches", one: "GenerationBatch" });
  }

  release(entry) {
    entry.gallery?.release();
  }

  card(batch, key) {
    const parts = {
      badge: h("span"),
      progress: h("progress", { max: "1", "aria-label": `Progress of ${key}` }),
      summary: h("p", { class: "summary" }),
      meta: h("p", { class: "hint" }),
      message: h("p", { class: "message" }),
      toggle: h("button", { type: "button", "aria-expanded": "false" }, "Show outputs"),
      slot: h("div"),
    };
    const entry = { card: null, parts, gallery: null };
    parts.toggle.addEventListener("click", () => this.toggle(entry, key));
    entry.card = h(
      "article",
      { class: "card batch", "data-batch": key },
      h("h3", {}, key, " ", parts.badge),
      parts.meta,
      parts.progress,
      parts.summary,
      parts.message,
      h("div", { class: "actions" }, parts.toggle),
      parts.slot,
    );
    return entry;
  }

  update(entry, batch) {
    const { parts } = entry;
    fill(parts.badge, badge(batch.phase));
    const total = batch.total || 0;
    parts.progress.max = Math.max(total, 1);
    parts.progress.value = batch.succeeded || 0;
    parts.summary.textContent = batchSummary(batch);
    parts.meta.textContent = [
      batch.model && `model ${batch.model}`,
      batch.outputLocation && `outputs in ${batch.outputLocation}`,
      batch.created && `created ${new Date(batch.created).toLocaleString()}`,
    ]
      .filter(Boolean)
      .join(" · ");
    parts.message.textContent = batch.message || "";
    parts.message.hidden = !batch.message;
  }

  toggle(entry, key) {
    const open = entry.parts.toggle.getAttribute("aria-expanded") === "true";
    if (open) {
      entry.gallery?.release();
      entry.gallery = null;
      fill(entry.parts.slot);
      entry.parts.toggle.setAttribute("aria-expanded", "false");
      entry.parts.toggle.textContent = "Show outputs";
      return;
    }
    const [namespace, name] = key.split("/");
    entry.gallery = new Gallery(
      `/v1/batches/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}/outputs`,
      key,
    );
    fill(entry.parts.slot, entry.gallery.element);
    entry.parts.toggle.setAttribute("aria-expanded", "true");
    entry.parts.toggle.textContent = "Hide outputs";
    entry.gallery.go(0);
  }
}
