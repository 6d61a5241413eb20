// The workbench: a system prompt, a multi-turn conversation streamed one answer at a time, and the
// selected model's parameters.

import { ApiError } from "./api.js";
import { $, clearNotice, copyText, h, notify } from "./dom.js";
import { answerView, requestBody, runInto } from "./run.js";
import { renderParams } from "./schema.js";
import { shareUrl } from "./state.js";

export class Workbench {
  constructor(app) {
    this.app = app;
    this.controller = null;
    const { state } = app;
    $("#system-prompt").value = state.system;
    $("#prompt").value = state.draft;
    $("#system-prompt").addEventListener("input", (e) => { state.system = e.target.value; app.changed(); });
    $("#prompt").addEventListener("input", (e) => { state.draft = e.target.value; app.changed(); });
    $("#prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); this.send(); }
    });
    $("#send").addEventListener("click", () => this.send());
    $("#stop").addEventListener("click", () => this.controller?.abort());
    $("#clear").addEventListener("click", () => { state.messages = []; this.renderConversation(); app.changed(); });
    $("#share").addEventListener("click", () => {
      const url = shareUrl(state);
      $("#share-url").value = url;
      $("#share-url").hidden = false;
      copyText(url);
    });
    this.renderConversation();
  }

  renderParams() {
    const { state } = this.app;
    renderParams($("#params"), this.app.specsOf(state.model), state.params, () => this.app.changed());
  }

  renderConversation() {
    $("#conversation").replaceChildren(...this.app.state.messages.map((message, index) => {
      const view = answerView(message.role, message.content, message.stats);
      view.root.append(h("button", { type: "button", class: "remove", "aria-label": "Remove this message",
        title: "Remove this message", onclick: () => {
          this.app.state.messages.splice(index, 1);
          this.renderConversation();
          this.app.changed();
        } }, "×"));
      return h("li", {}, view.root);
    }));
  }

  // The body a send would carry now: what the API tab shows (a trailing answer is the reply to it).
  currentBody() {
    const { state } = this.app;
    const messages = [...state.messages];
    if (messages.at(-1)?.role === "assistant") messages.pop();
    if (state.draft.trim()) messages.push({ role: "user", content: state.draft });
    return requestBody(state.model, state.system, messages, state.params);
  }

  async send() {
    const { app } = this;
    const { state } = app;
    if (this.controller) return;
    if (!app.requireKey()) return;
    if (state.draft.trim()) {
      state.messages.push({ role: "user", content: state.draft });
      state.draft = "";
      $("#prompt").value = "";
    }
    if (state.messages.at(-1)?.role !== "user") {
      notify("Write a message first.");
      return;
    }
    const body = requestBody(state.model, state.system, state.messages, state.params);
    state.lastBody = body;
    this.renderConversation();
    app.changed();
    const view = answerView();
    $("#conversation").append(h("li", {}, view.root));
    view.root.scrollIntoView({ block: "nearest" });
    this.setRunning(new AbortController());
    try {
      clearNotice();
      const { text, stats } = await runInto(view, body, app.key(), this.controller.signal);
      state.messages.push({ role: "assistant", content: text, stats });
    } catch (error) {
      view.root.parentElement.remove();
      if (error.name !== "AbortError") notify(error instanceof ApiError ? error.message : String(error));
    } finally {
      this.setRunning(null);
      this.renderConversation();
      app.changed();
    }
  }

  setRunning(controller) {
    this.controller = controller;
    $("#send").disabled = Boolean(controller);
    $("#stop").disabled = !controller;
  }
}
