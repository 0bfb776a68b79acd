// A small element builder: text always goes in as text nodes (never innerHTML), so nothing an API answers
// (prompts, messages, names) can inject markup.
import { stateLabel } from "./format.js";

export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replaces an element's children. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** A state as symbol + word (colour only as a hint): "✓ Ready". */
export function badge(state) {
  const { symbol, word, tone } = stateLabel(state);
  return h("span", { class: `badge tone-${tone}`, "data-state": word }, h("span", { "aria-hidden": "true" }, symbol), ` ${word}`);
}

/** A table in a scroll box: wide tables scroll sideways on a phone instead of widening the page. */
export function table(caption, headers, rows) {
  return h(
    "div",
    { class: "table-box", tabindex: "0", role: "region", "aria-label": caption },
    h(
      "table",
      {},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows),
    ),
  );
}
