// Fleet: per model its state, queue and oldest wait; its SDInstances with phase, reason, GPU and replicas.
// Polled every 2 s while shown (GET /v1/fleet); says when the gateway's discovery is stale.
import * as api from "./api.js";
import { badge, fill, h, table } from "./dom.js";
import { formatSeconds } from "./format.js";
import { Poller, updatedText } from "./poller.js";

const $ = (id) => document.getElementById(id);

/** /v1/fleet's shape from /v1/models and /v1/instances, for a gateway without /v1/fleet. */
async function fleetFromModels() {
  const [models, backends] = await Promise.all([api.get("/v1/models"), api.get("/v1/instances")]);
  return {
    models: models.map((m) => ({
      model: m.filename,
      state: m.state,
      queue: m.queue,
      running: backends.filter((b) => b.model === m.filename).reduce((n, b) => n + (b.inflight || 0), 0),
      oldestWaitSeconds: null,
      instances: backends
        .filter((b) => b.model === m.filename)
        .map((b) => ({ name: b.instance || b.url, phase: b.state, gpu: b.gpu, replicas: 1, readyReplicas: 1 })),
    })),
    discovery: null,
  };
}

function replicas(instance) {
  const desired = instance.desiredReplicas ?? instance.replicas;
  return `${instance.readyReplicas ?? 0} ready of ${desired ?? "?"}${instance.autoscaling ? " (autoscaled)" : ""}`;
}

function instanceRow(instance) {
  const name = instance.namespace ? `${instance.namespace}/${instance.name}` : instance.name;
  const why = [instance.reason, instance.message].filter(Boolean).join(": ");
  return h(
    "tr",
    { "data-instance": name },
    h("th", { scope: "row" }, name),
    h("td", { "data-phase": instance.phase || "" }, badge(instance.phase)),
    h("td", {}, why || "—"),
    h("td", {}, instance.gpu || "—"),
    h("td", {}, replicas(instance)),
  );
}

function modelCard(entry) {
  const instances = entry.instances || [];
  return h(
    "article",
    { class: "card model", "data-model": entry.model },
    h("h3", {}, entry.model, " ", badge(entry.state)),
    h(
      "dl",
      { class: "stats" },
      h("div", {}, h("dt", {}, "Queued"), h("dd", {}, String(entry.queue ?? 0))),
      h("div", {}, h("dt", {}, "Running"), h("dd", {}, String(entry.running ?? 0))),
      h("div", {}, h("dt", {}, "Oldest wait"), h("dd", {}, formatSeconds(entry.oldestWaitSeconds))),
    ),
    instances.length === 0
      ? h("p", { class: "hint" }, "No SDInstance of this model is known to the gateway.")
      : table(
          `Instances of ${entry.model}`,
          ["Instance", "Phase", "Reason", "GPU", "Replicas"],
          instances.map(instanceRow),
        ),
  );
}

function discoveryText(discovery) {
  if (!discovery) return { text: "", stale: false };
  if (!discovery.up || discovery.staleSeconds > 0) {
    const since = discovery.staleSeconds > 0 ? ` for ${formatSeconds(discovery.staleSeconds)}` : "";
    return {
      text: `⚠ Stale: the gateway has not heard from the Kubernetes API${since}; this may be out of date.`,
      stale: true,
    };
  }
  return { text: "✓ Discovery is up to date.", stale: false };
}

export class FleetView {
  constructor() {
    this.useFleetRoute = true;
    this.last = null;
    this.poller = new Poller(() => this.refresh(), 2000);
  }

  start() {
    this.poller.start();
  }

  stop() {
    this.poller.stop();
  }

  async refresh() {
    let fleet;
    try {
      if (this.useFleetRoute) {
        try {
          fleet = await api.get("/v1/fleet");
        } catch (e) {
          if (e.status !== 404) throw e;
          this.useFleetRoute = false; // an older gateway: models and backends only
        }
      }
      fleet = fleet || (await fleetFromModels());
    } catch (e) {
      $("fleet-error").textContent = `Could not refresh: ${e.message}`;
      $("fleet-error").hidden = false;
      return;
    }
    $("fleet-error").hidden = true;
    const discovery = discoveryText(fleet.discovery);
    const note = $("fleet-discovery");
    note.textContent = discovery.text;
    note.className = discovery.stale ? "warning" : "hint";
    note.dataset.stale = String(discovery.stale);
    $("fleet-updated").textContent = updatedText();
    const models = fleet.models || [];
    // Rebuilt only when something changed, so keyboard focus in a table is not lost every 2 s.
    const seen = JSON.stringify(models);
    if (seen === this.last) return;
    this.last = seen;
    fill(
      $("fleet-models"),
      models.length === 0 ? h("p", {}, "No model is served or declared yet.") : models.map(modelCard),
    );
  }
}
