// The page: the key bar, the model catalog, the pages (one per #hash) and the state they share.

import { listModels } from "./api.js";
import { $, clearNotice, copyText, h, notify } from "./dom.js";
import { Compare } from "./compare.js";
import { Dashboard } from "./dashboard.js";
import { Operator } from "./operator.js";
import { fitParams, parameterSpecs } from "./schema.js";
import { snippet } from "./snippets.js";
import { loadKey, loadState, saveKey, saveState, sharedState } from "./state.js";
import { Workbench } from "./workbench.js";

const PAGES = ["workbench", "compare", "api", "account", "keys", "usage", "operator"];

class App {
  constructor() {
    this.state = loadState();
    this.models = [];
    const shared = sharedState(this.state);
    if (shared) {
      this.state = shared;
      saveState(shared);
      history.replaceState(null, "", "#workbench");
      notify("Opened a shared conversation.", "info");
    }
    this.setUpKey();
    this.workbench = new Workbench(this);
    this.compare = new Compare(this);
    this.dashboard = new Dashboard(this);
    this.operator = new Operator(this, this.dashboard);
    this.setUpApiTab();
    $("#model").addEventListener("change", (e) => {
      this.state.model = e.target.value;
      this.fitParams(this.state);
      this.workbench.renderParams();
      this.changed();
    });
    window.addEventListener("hashchange", () => this.route());
    this.route();
    this.loadModels();
  }

  setUpKey() {
    const input = $("#api-key");
    const remember = $("#remember-key");
    const stored = loadKey();
    input.value = stored || "";
    remember.checked = Boolean(stored);
    const save = () => saveKey(input.value.trim(), remember.checked);
    input.addEventListener("input", () => { save(); this.renderApiTab(); });
    remember.addEventListener("change", save);
  }

  key() {
    return $("#api-key").value.trim();
  }

  useKey(secret) {
    $("#api-key").value = secret;
    saveKey(secret, $("#remember-key").checked);
  }

  requireKey() {
    if (this.key()) return true;
    notify("Enter an API key first (create one on the Keys page, or with `mistral-serve keys create`).");
    $("#api-key").focus();
    return false;
  }

  async loadModels() {
    try {
      this.models = await listModels();
    } catch (error) {
      notify(error.message);
      return;
    }
    if (!this.models.some((m) => m.id === this.state.model)) this.state.model = this.models[0]?.id || "";
    $("#model").replaceChildren(...this.models.map((m) =>
      h("option", { value: m.id, selected: m.id === this.state.model, title: servedBy(m) },
        m.pool ? `${m.id} · pool of ${m.pool.upstreams.length}` : m.id)));
    this.fitParams(this.state);
    for (const pane of this.state.panes) this.fitParams(pane);
    this.workbench.renderParams();
    this.compare.render();
    this.renderApiTab();
    document.body.dataset.ready = "true";
  }

  specsOf(modelId) {
    return parameterSpecs(this.models.find((m) => m.id === modelId)?.json_request_schema);
  }

  // Keeps only the parameters `holder.model` declares, within its bounds (max_tokens within its context).
  fitParams(holder) {
    if (this.models.length) holder.params = fitParams(this.specsOf(holder.model), holder.params || {});
  }

  changed() {
    saveState(this.state);
    if (this.page === "api") this.renderApiTab();
  }

  route() {
    const page = PAGES.find((name) => location.hash === `#${name}`) || "workbench";
    if (this.page && page !== this.page) clearNotice();  // a message belongs to the page it was shown on
    this.page = page;
    for (const name of PAGES) $(`#page-${name}`).hidden = name !== page;
    for (const link of document.querySelectorAll("#nav a")) {
      link.classList.toggle("active", link.dataset.page === page);
      if (link.dataset.page === page) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (page === "api") this.renderApiTab();
    this.dashboard.show(page);
    this.operator.show(page);
  }

  // Shows `page` now (hashchange would come later), so a message shown next stays on it.
  go(page) {
    history.pushState(null, "", `#${page}`);
    this.route();
  }

  setUpApiTab() {
    for (const tab of document.querySelectorAll("#snippet-tabs [data-lang]")) {
      tab.addEventListener("click", () => { this.state.lang = tab.dataset.lang; this.changed(); this.renderApiTab(); });
    }
    $("#include-key").addEventListener("change", () => this.renderApiTab());
    $("#copy-snippet").addEventListener("click", () => copyText($("#snippet").textContent));
  }

  renderApiTab() {
    const lang = this.state.lang || "curl";
    for (const tab of document.querySelectorAll("#snippet-tabs [data-lang]")) {
      tab.setAttribute("aria-selected", String(tab.dataset.lang === lang));
    }
    const key = $("#include-key").checked ? this.key() : null;
    $("#snippet").textContent = snippet(lang, { baseUrl: location.origin, body: this.workbench.currentBody(), key });
  }
}

window.addEventListener("DOMContentLoaded", () => { window.app = new App(); });

// What serves a model, for its option's tooltip: the engine in the server's process, or a pool's upstreams.
function servedBy(model) {
  if (!model.pool) return model.backend ? `in this server: ${model.backend.device}, ${model.backend.dtype}` : "";
  const upstreams = model.pool.upstreams.map((u) => `${u.name} (${u.state})`).join(", ");
  return `a pool (${model.pool.policy}): ${upstreams}`;
}
