// Compare: panes side by side, each with its own model and parameters, answering the same
// conversation at the same time.

import { ApiError } from "./api.js";
import { $, clearNotice, h, notify } from "./dom.js";
import { answerView, requestBody, runInto } from "./run.js";
import { renderParams } from "./schema.js";
import { emptyPane } from "./state.js";

export class Compare {
  constructor(app) {
    this.app = app;
    this.controller = null;
    this.views = [];
    const prompt = $("#compare-prompt");
    prompt.value = app.state.comparePrompt;
    prompt.addEventListener("input", () => { app.state.comparePrompt = prompt.value; app.changed(); });
    prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); this.run(); }
    });
    $("#compare-run").addEventListener("click", () => this.run());
    $("#compare-stop").addEventListener("click", () => this.controller?.abort());
    $("#compare-add").addEventListener("click", () => this.addPane());
  }

  // A new pane starts as a copy of the last one (model and parameters), to change one thing at a time.
  addPane() {
    if (this.controller) return;
    const { state } = this.app;
    const last = state.panes.at(-1);
    const pane = last ? { model: last.model, params: structuredClone(last.params) } : emptyPane();
    state.panes.push(pane);
    this.app.fitParams(pane);
    this.app.changed();
    this.render();
  }

  removePane(index) {
    if (this.controller || this.app.state.panes.length <= 2) return;
    this.app.state.panes.splice(index, 1);
    this.app.changed();
    this.render();
  }

  render() {
    const { app } = this;
    this.views = app.state.panes.map((pane, index) => {
      if (!app.models.some((m) => m.id === pane.model)) pane.model = app.state.model;
      const select = h("select", { "aria-label": `Model of pane ${index + 1}`, class: "pane-model" },
        ...app.models.map((m) => h("option", { value: m.id, selected: m.id === pane.model }, m.id)));
      const params = h("div", { class: "params" });
      const draw = () => renderParams(params, app.specsOf(pane.model), pane.params, () => app.changed());
      select.addEventListener("change", () => { pane.model = select.value; app.fitParams(pane); draw(); app.changed(); });
      draw();
      const answer = answerView();
      const remove = app.state.panes.length > 2
        ? h("button", { type: "button", class: "remove-pane", "aria-label": `Remove pane ${index + 1}`,
                        onclick: () => this.removePane(index) }, "×")
        : null;
      const root = h("section", { class: "pane", "data-pane": index, "aria-label": `Pane ${index + 1}` },
        h("div", { class: "pane-head" }, h("h2", {}, `Pane ${String.fromCharCode(65 + index)}`), remove), select,
        h("details", { class: "pane-params", open: true }, h("summary", {}, "Parameters"), params),
        answer.root);
      return { root, answer };
    });
    $("#panes").replaceChildren(...this.views.map((view) => view.root));
  }

  async run() {
    const { app } = this;
    const { state } = app;
    if (this.controller || !app.requireKey()) return;
    const messages = state.messages.map(({ role, content }) => ({ role, content }));
    if (state.comparePrompt.trim()) messages.push({ role: "user", content: state.comparePrompt });
    if (messages.at(-1)?.role !== "user") {
      notify("Write a message first: the panes answer the workbench conversation plus this message.");
      return;
    }
    this.render();
    this.controller = new AbortController();
    $("#compare-run").disabled = true;
    $("#compare-add").disabled = true;
    $("#compare-stop").disabled = false;
    clearNotice();
    const runs = state.panes.map((pane, index) => {
      const body = requestBody(pane.model, state.system, messages, pane.params);
      return runInto(this.views[index].answer, body, app.key(), this.controller.signal).catch((error) => {
        if (error.name === "AbortError") return;
        this.views[index].answer.stats.textContent = "failed";
        notify(error instanceof ApiError ? error.message : String(error));
      });
    });
    await Promise.all(runs);
    this.controller = null;
    $("#compare-run").disabled = false;
    $("#compare-add").disabled = false;
    $("#compare-stop").disabled = true;
  }
}
