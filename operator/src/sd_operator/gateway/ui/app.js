// The console's entry: asks for a key when the gateway wants one, then shows the four views as tabs.
import * as api from "./api.js";
import { BatchesView } from "./batches.js";
import { FleetView } from "./fleet.js";
import { GenerateView } from "./generate.js";
import { TrainingView } from "./training.js";

const $ = (id) => document.getElementById(id);
const REFUSED = "The key was refused. Check it and try again.";
const views = {};
let current = null;

function show(part) {
  $("loading").hidden = true;
  $("key-gate").hidden = part !== "key";
  $("app").hidden = part !== "app";
  $("session").hidden = part !== "app" || !api.hasKey();
}

function askForKey(message) {
  for (const view of Object.values(views)) view.stop();
  current = null;
  show("key");
  const error = $("key-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("key-input").value = "";
  $("key-input").focus();
}

/** One call that every caller with a valid key (or anyone, without keys) may make. */
async function probe() {
  try {
    return { ok: true, models: await api.get("/v1/models", { quietRefusal: true }) };
  } catch (e) {
    if (e.status === 401 || e.status === 403) return { ok: false };
    return { ok: true, models: null, error: e }; // let in: the views say what does not work
  }
}

function selectTab(name, focus = false) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    const selected = tab.dataset.view === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
    if (selected && focus) tab.focus();
  }
  if (current !== name) {
    if (current) views[current].stop();
    current = name;
    views[name].start();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab.dataset.view));
    // The ARIA tabs pattern: arrows move between tabs, Tab goes on into the panel.
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length].dataset.view, true);
    });
  }
  window.addEventListener("hashchange", () => {
    const name = location.hash.slice(1);
    if (views[name] && !$("app").hidden) selectTab(name);
  });
}

async function enter(models) {
  show("app");
  views.generate.load(models);
  const wanted = location.hash.slice(1);
  selectTab(views[wanted] ? wanted : "generate");
}

async function main() {
  views.generate = new GenerateView();
  views.fleet = new FleetView();
  views.batches = new BatchesView();
  views.training = new TrainingView();
  setUpTabs();
  api.onRefused(() => askForKey(REFUSED));

  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("key-input").value.trim();
    if (!value) {
      askForKey("Enter a key.");
      return;
    }
    $("key-submit").disabled = true;
    api.setKey(value, false);
    const result = await probe();
    $("key-submit").disabled = false;
    if (!result.ok) {
      api.setKey("", false);
      askForKey(REFUSED);
      return;
    }
    api.setKey(value, true);
    await enter(result.models);
  });
  $("forget-key").addEventListener("click", () => {
    api.setKey("", false);
    askForKey("");
  });

  const hadKey = api.hasKey();
  const result = await probe();
  if (result.ok) {
    await enter(result.models);
  } else {
    api.setKey("", false);
    askForKey(hadKey ? REFUSED : "");
  }
}

main();
