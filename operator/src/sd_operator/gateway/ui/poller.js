// Polls while its view is shown: one call at a time (the next starts `intervalMs` after the last ended), none
// while the tab is hidden in the browser.
export class Poller {
  constructor(fn, intervalMs) {
    this.fn = fn;
    this.intervalMs = intervalMs;
    this.timer = null;
    this.running = false;
    document.addEventListener("visibilitychange", () => {
      if (this.running && document.visibilityState === "visible") this.kick();
    });
  }

  start() {
    this.running = true;
    this.kick();
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
  }

  async kick() {
    clearTimeout(this.timer);
    if (!this.running) return;
    await this.fn();
    if (this.running && document.visibilityState === "visible") {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.kick(), this.intervalMs);
    }
  }
}

export function updatedText(prefix = "Updated") {
  return `${prefix} ${new Date().toLocaleTimeString()}`;
}
