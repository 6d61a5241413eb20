// The account pages: log in / sign up / log out, the keys of the account, and its usage.

import { account, hasSession } from "./api.js";
import { $, copyText, formatDate, h, notify } from "./dom.js";
import { drawUsageChart } from "./chart.js";
import { describeKeyLimits, describePlanLimits } from "./limits.js";

const DAY_MS = 86400000;
const isoDay = (date) => date.toISOString().slice(0, 10);

export class Dashboard {
  constructor(app) {
    this.app = app;
    this.me = null;
    $("#auth-form").addEventListener("submit", (event) => { event.preventDefault(); this.logIn("login"); });
    $("#signup").addEventListener("click", () => {
      if ($("#auth-form").reportValidity()) this.logIn("signup");
    });
    $("#logout").addEventListener("click", () => this.logOut());
    $("#password-form").addEventListener("submit", (event) => { event.preventDefault(); this.changePassword(); });
    $("#delete-account-form").addEventListener("submit", (event) => { event.preventDefault(); this.deleteAccount(); });
    $("#key-form").addEventListener("submit", (event) => { event.preventDefault(); this.createKey(); });
    $("#copy-secret").addEventListener("click", () => copyText($("#secret-value").textContent));
    $("#use-secret").addEventListener("click", () => {
      this.app.useKey($("#secret-value").textContent);
      notify("The workbench now uses this key.", "info");
    });
    $("#dismiss-secret").addEventListener("click", () => { $("#new-secret").hidden = true; $("#secret-value").textContent = ""; });
    $("#usage-form").addEventListener("submit", (event) => { event.preventDefault(); this.loadUsage(); });
    const today = new Date();
    $("#usage-until").value = isoDay(today);
    $("#usage-since").value = isoDay(new Date(today - 29 * DAY_MS));
    this.ready = hasSession() ? this.refreshMe() : Promise.resolve(this.showLoggedIn(null));
    this.showSignupPolicy();
  }

  async refreshMe() {
    try {
      this.showLoggedIn(await account("GET", "/me"));
    } catch {
      this.showLoggedIn(null);
    }
  }

  showLoggedIn(me) {
    this.me = me;
    document.body.classList.toggle("logged-in", Boolean(me));
    document.body.classList.toggle("is-admin", Boolean(me?.is_admin));
    $("#account-link").textContent = me ? "Account" : "Log in";
    $("#account-out").hidden = Boolean(me);
    $("#account-in").hidden = !me;
    if (me) {
      $("#account-email").textContent = me.email;
      $("#account-created").textContent = formatDate(me.created_at);
      $("#account-plan").textContent = me.plan ? `${me.plan.name} (${describePlanLimits(me.plan.limits)})`
        : "none: no limits";
    }
  }

  async show(page) {
    if (!["keys", "usage"].includes(page)) return;
    await this.ready;
    if (!this.me) {
      this.app.go("account");
      notify("Log in to see your keys and usage.");
      return;
    }
    if (page === "keys") await this.loadKeys();
    else await this.loadUsage();
  }

  async guard(action) {
    try {
      return await action();
    } catch (error) {
      if (error.status === 401 && error.code === "not_logged_in") this.showLoggedIn(null);
      notify(error.message);
      return undefined;
    }
  }

  async logIn(kind) {
    const email = $("#auth-email").value.trim();
    const password = $("#auth-password").value;
    await this.guard(async () => {
      if (kind === "signup") {
        const invite = $("#auth-invite").value.trim();
        await account("POST", "/signup", invite ? { email, password, invite_code: invite } : { email, password });
      }
      try {
        await account("POST", "/login", { email, password });
      } catch (error) {
        // sign-up answers a taken email as a new one: only the log-in after it can tell
        if (kind === "signup" && error.code === "invalid_credentials") {
          error.message = "This email already has an account, with another password: log in with that one.";
        }
        throw error;
      }
      $("#auth-password").value = "";
      await this.refreshMe();
      this.app.go("keys");
      notify(kind === "signup" ? "Welcome! Create a key to use the workbench." : "Logged in.", "info");
    });
  }

  // sign-up as the server allows it: by anyone, with an invitation code, or not at all
  async showSignupPolicy() {
    let mode = "open";
    try {
      mode = (await account("GET", "/signup")).mode;
    } catch { /* an older server: the button stays, and the server answers for itself */ }
    $("#auth-invite-field").hidden = mode !== "invite";
    $("#signup").hidden = mode === "closed";
    $("#signup-closed").hidden = mode !== "closed";
  }

  async logOut() {
    await this.guard(async () => {
      await account("POST", "/logout");
      this.showLoggedIn(null);
      notify("Logged out.", "info");
    });
  }

  async changePassword() {
    await this.guard(async () => {
      await account("POST", "/password", { current_password: $("#current-password").value,
                                           new_password: $("#new-password").value });
      $("#current-password").value = "";
      $("#new-password").value = "";
      notify("Password changed.", "info");
    });
  }

  async deleteAccount() {
    if (!confirm("Delete your account and all its keys? This cannot be undone.")) return;
    await this.guard(async () => {
      await account("DELETE", "", { password: $("#delete-password").value });
      this.showLoggedIn(null);
      notify("Your account is deleted.", "info");
    });
  }

  // --- keys ---

  async createKey() {
    const number = (selector) => ($(selector).value ? Number($(selector).value) : null);
    const limits = { requests_per_minute: number("#key-rpm"), tokens_per_minute: number("#key-tpm"),
                     token_budget: number("#key-budget"), budget_period: $("#key-period").value || null };
    const hasLimits = Object.values(limits).some((value) => value !== null);
    await this.guard(async () => {
      const created = await account("POST", "/keys", { name: $("#key-name").value.trim(), ...(hasLimits ? { limits } : {}) });
      $("#secret-value").textContent = created.secret;
      $("#new-secret").hidden = false;
      $("#key-form").reset();
      await this.loadKeys();
    });
  }

  async loadKeys() {
    const listed = await this.guard(() => account("GET", "/keys"));
    if (!listed) return;
    const rows = listed.data.map((key) => this.keyRow(key));
    $("#keys-table tbody").replaceChildren(...(rows.length ? rows
      : [h("tr", {}, h("td", { colSpan: 9, class: "empty" }, "No keys yet: create one above."))]));
  }

  keyRow(key) {
    const tokens = key.usage.prompt_tokens + key.usage.completion_tokens;
    const patch = (change) => this.guard(async () => { await account("PATCH", `/keys/${key.id}`, change); await this.loadKeys(); });
    // a key the operator disabled can only be enabled by the operator: say why, offer no button
    const toggle = key.is_operator_disabled ? null
      : h("button", { type: "button", class: "toggle-key", onclick: () => patch({ is_enabled: !key.is_enabled }) },
          key.is_enabled ? "Disable" : "Enable");
    return h("tr", { "data-key-id": key.id, class: key.is_enabled ? "" : "disabled" },
      h("td", { "data-label": "Name" }, key.name),
      h("td", { "data-label": "Key" }, h("code", {}, `${key.prefix}…`)),
      h("td", { "data-label": "Created" }, formatDate(key.created_at)),
      h("td", { "data-label": "Last used" }, formatDate(key.last_used_at)),
      h("td", { "data-label": "Requests" }, String(key.usage.requests)),
      h("td", { "data-label": "Tokens" }, String(tokens)),
      h("td", { "data-label": "Limits", class: "limits" }, keyLimits(key)),
      h("td", { "data-label": "State" }, keyState(key)),
      h("td", { class: "row-actions" },
        toggle,
        h("button", { type: "button", class: "rename-key", onclick: () => {
          const name = prompt("New name for this key", key.name);
          if (name && name.trim()) patch({ name: name.trim() });
        } }, "Rename"),
        h("button", { type: "button", class: "delete-key danger", onclick: () => {
          if (!confirm(`Delete the key "${key.name}"? Programs that use it will stop working.`)) return;
          this.guard(async () => { await account("DELETE", `/keys/${key.id}`); await this.loadKeys(); });
        } }, "Delete")));
  }

  // --- usage ---

  async loadUsage() {
    const range = `since=${$("#usage-since").value}&until=${$("#usage-until").value}`;
    const results = await this.guard(() => Promise.all(["day", "key", "model"].map(
      (by) => account("GET", `/usage?${range}&by=${by}`))));
    if (!results) return;
    const [byDay, byKey, byModel] = results.map((result) => result.data);
    drawUsageChart($("#usage-chart"), fillDays(byDay, $("#usage-since").value, $("#usage-until").value));
    usageTable($("#usage-by-key"), "Key", byKey.map((row) => ({ ...row, label: row.key_name ?? row.key_id })));
    usageTable($("#usage-by-model"), "Model", byModel.map((row) => ({ ...row, label: row.model })));
  }
}

function keyLimits(key) {
  const own = describeKeyLimits(key.limits) || "none";
  const ceiling = describeKeyLimits(key.ceiling);
  return ceiling ? [h("div", {}, own), h("div", { class: "ceiling" }, `ceiling: ${ceiling}`)] : own;
}

function keyState(key) {
  const badge = h("span", { class: `badge ${key.is_enabled ? "on" : "off"}` }, key.is_enabled ? "enabled" : "disabled");
  if (!key.is_operator_disabled) return badge;
  const why = `Disabled by the operator${key.disabled_reason ? `: ${key.disabled_reason}` : ""}.`;
  return [badge, h("div", { class: "operator-reason" }, why)];
}

// every day of the range, with zeros where nothing was used
function fillDays(rows, since, until) {
  const byDay = new Map(rows.map((row) => [row.day, row]));
  const days = [];
  for (let day = new Date(`${since}T00:00:00Z`); isoDay(day) <= until && days.length < 366; day = new Date(+day + DAY_MS)) {
    const row = byDay.get(isoDay(day)) || {};
    days.push({ day: isoDay(day), requests: row.requests || 0,
                tokens: (row.prompt_tokens || 0) + (row.completion_tokens || 0) });
  }
  return days;
}

function usageTable(table, what, rows) {
  const columns = [["label", what], ["requests", "Requests"], ["failed_requests", "Failed"],
                   ["prompt_tokens", "Prompt tokens"], ["cached_prompt_tokens", "Cached"],
                   ["completion_tokens", "Completion tokens"]];
  table.replaceChildren(
    h("thead", {}, h("tr", {}, ...columns.map(([, title]) => h("th", {}, title)))),
    h("tbody", {}, ...(rows.length ? rows.map((row) => h("tr", {},
      ...columns.map(([name, title]) => h("td", { "data-label": title }, String(row[name] ?? 0)))))
      : [h("tr", {}, h("td", { colSpan: columns.length, class: "empty" }, "Nothing used in this range."))])));
}
