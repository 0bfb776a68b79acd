// A view that lists a watched kind (GenerationBatches, LoRAJobs) as one card per object, refreshed by polling:
// cards are kept across refreshes (an open gallery keeps its page), follow the gateway's order and go when
// their object does. Subclasses build a card (`card`), fill it (`update`) and free what it holds (`release`).
import * as api from "./api.js";
import { fill, h } from "./dom.js";
import { watchNote } from "./format.js";
import { Poller, updatedText } from "./poller.js";

const $ = (id) => document.getElementById(id);

export class CardListView {
  /** `prefix` names the page's elements (`<prefix>-list`, `-error`, `-updated`, `-watch`); `kind` and `one`
   * name the kind in the plural and the singular. */
  constructor({ prefix, path, kind, one, intervalMs = 3000 }) {
    Object.assign(this, { prefix, path, kind, one });
    this.cards = new Map(); // namespace/name -> entry (at least {card})
    this.poller = new Poller(() => this.refresh(), intervalMs);
  }

  start() {
    this.poller.start();
  }

  stop() {
    this.poller.stop();
  }

  card(_object, _key) {
    throw new Error("a CardListView subclass builds its cards");
  }

  update(_entry, _object) {}

  release(_entry) {}

  async refresh() {
    const el = (part) => $(`${this.prefix}-${part}`);
    let answer;
    try {
      answer = await api.get(this.path);
    } catch (e) {
      el("error").textContent =
        e.status === 404 ? `This gateway does not list ${this.kind} (no GET ${this.path}).` : `Could not refresh: ${e.message}`;
      el("error").hidden = false;
      return;
    }
    el("error").hidden = true;
    el("updated").textContent = updatedText();
    const note = watchNote(answer.watch, this.kind);
    el("watch").textContent = note;
    el("watch").hidden = !note;
    const items = answer.items || [];
    const list = el("list");
    const seen = new Set();
    for (const object of items) {
      const key = `${object.namespace}/${object.name}`;
      seen.add(key);
      let entry = this.cards.get(key);
      if (!entry) {
        entry = this.card(object, key);
        this.cards.set(key, entry);
      }
      this.update(entry, object);
      list.append(entry.card); // keeps the gateway's order; moving an element keeps its state
    }
    for (const [key, entry] of this.cards) {
      if (!seen.has(key)) {
        this.release(entry);
        entry.card.remove();
        this.cards.delete(key);
      }
    }
    if (items.length === 0) fill(list, h("p", {}, `No ${this.one} yet.`));
    else list.querySelector(":scope > p")?.remove();
  }
}
