// The operator's page: every account with its usage, plan, role and state (and its keys, on demand);
// the plans and their editor; the invitations. Shown to operators only; the server checks every call.

import { admin } from "./api.js";
import { $, copyText, formatDate, h, notify } from "./dom.js";
import { PLAN_LIMIT_NAMES, describeKeyLimits, describePlanLimits } from "./limits.js";

export class Operator {
  constructor(app, dashboard) {
    this.app = app;
    this.dashboard = dashboard;
    this.plans = [];
    this.editing = null;  // the plan the form edits; null: the form makes a new one
    this.openKeys = new Set();  // the accounts whose keys are shown
    $("#plan-form").addEventListener("submit", (event) => { event.preventDefault(); this.savePlan(); });
    $("#plan-cancel").addEventListener("click", () => this.editPlan(null));
    $("#invite-form").addEventListener("submit", (event) => { event.preventDefault(); this.createInvite(); });
    $("#copy-invite").addEventListener("click", () => copyText($("#invite-code").textContent));
    $("#dismiss-invite").addEventListener("click", () => {
      $("#invite-code-card").hidden = true;
      $("#invite-code").textContent = "";
    });
  }

  async show(page) {
    if (page !== "operator") return;
    await this.dashboard.ready;
    if (!this.dashboard.me?.is_admin) {
      this.app.go(this.dashboard.me ? "keys" : "account");
      notify("Only an operator can open the operator's page.");
      return;
    }
    await this.load();
  }

  async load() {
    const loaded = await this.dashboard.guard(() => Promise.all(
      ["/plans", "/accounts", "/invites"].map((path) => admin("GET", path))));
    if (!loaded) return;
    const [plans, accounts, invites] = loaded.map((listed) => listed.data);
    this.plans = plans;
    this.renderPlans();
    await this.renderAccounts(accounts);
    this.renderInvites(invites);
  }

  // Sends one change, then shows everything as it now is.
  change(method, path, body, done) {
    return this.dashboard.guard(async () => {
      await admin(method, path, body);
      await this.load();
      if (done) notify(done, "info");
      return true;
    });
  }

  // --- accounts ---

  async renderAccounts(accounts) {
    const rows = [];
    for (const account of accounts) {
      rows.push(this.accountRow(account));
      if (this.openKeys.has(account.id)) rows.push(await this.keysRow(account));
    }
    $("#admin-accounts tbody").replaceChildren(...rows);
  }

  accountRow(account) {
    const isMe = account.email === this.dashboard.me?.email;
    const url = `/accounts/${account.id}`;
    const defaultPlan = this.plans.find((plan) => plan.is_default);
    const planSelect = h("select", { class: "account-plan", "aria-label": `Plan of ${account.email}`,
                                     onchange: (event) => this.change("PATCH", url, { plan: event.target.value || null },
                                                                      `${account.email} is on a new plan.`) },
      h("option", { value: "", selected: account.plan === null }, `default (${defaultPlan?.name ?? "no limits"})`),
      ...this.plans.map((plan) => h("option", { value: plan.name, selected: plan.name === account.plan }, plan.name)));
    const { last_30_days: recent, all_time: allTime } = account.usage;
    const state = [h("span", { class: `badge ${account.is_enabled ? "on" : "off"}` },
                     account.is_enabled ? "enabled" : "disabled")];
    if (!account.is_enabled && account.disabled_reason) {
      state.push(h("div", { class: "disabled-reason" }, account.disabled_reason));
    }
    return h("tr", { "data-account-id": account.id, "data-email": account.email,
                     class: account.is_enabled ? "" : "disabled" },
      h("td", { "data-label": "Email" }, account.email, isMe ? " (you)" : ""),
      h("td", { "data-label": "Role" }, account.is_admin ? "operator" : "user"),
      h("td", { "data-label": "Plan" }, planSelect),
      h("td", { "data-label": "Keys" }, String(account.num_keys)),
      h("td", { "data-label": "Requests (30 days)", class: "recent-requests" }, String(recent.requests)),
      h("td", { "data-label": "Tokens (30 days)", class: "recent-tokens" }, String(recent.tokens)),
      h("td", { "data-label": "Requests (all time)" }, String(allTime.requests)),
      h("td", { "data-label": "Tokens (all time)" }, String(allTime.tokens)),
      h("td", { "data-label": "State" }, state),
      h("td", { class: "row-actions" },
        isMe ? null : h("button", { type: "button", class: "toggle-account", onclick: () => this.toggleAccount(account) },
                        account.is_enabled ? "Disable" : "Enable"),
        isMe ? null : h("button", { type: "button", class: "toggle-admin", onclick: () => {
          const verb = account.is_admin ? "Remove the operator role of" : "Make an operator of";
          if (confirm(`${verb} ${account.email}?`)) this.change("PATCH", url, { is_admin: !account.is_admin });
        } }, account.is_admin ? "Remove operator" : "Make operator"),
        h("button", { type: "button", class: "show-keys", onclick: () => {
          if (!this.openKeys.delete(account.id)) this.openKeys.add(account.id);
          this.load();
        } }, this.openKeys.has(account.id) ? "Hide keys" : "Keys")));
  }

  toggleAccount(account) {
    const url = `/accounts/${account.id}`;
    if (account.is_enabled) {
      const reason = prompt(`Why disable ${account.email}? Its owner is shown this, and its keys stop working.`, "");
      if (reason === null) return;
      this.change("PATCH", url, { is_enabled: false, disabled_reason: reason.trim() || null },
                  `${account.email} is disabled.`);
    } else {
      this.change("PATCH", url, { is_enabled: true }, `${account.email} is enabled.`);
    }
  }

  async keysRow(account) {
    const listed = await this.dashboard.guard(() => admin("GET", `/accounts/${account.id}/keys`));
    const keys = listed ? listed.data : [];
    const rows = keys.map((key) => h("tr", { "data-key-id": key.id, class: key.is_enabled ? "" : "disabled" },
      h("td", {}, key.name), h("td", {}, h("code", {}, `${key.prefix}…`)),
      h("td", {}, `${key.usage.requests} requests`),
      h("td", {}, describeKeyLimits(key.limits) || "no limits",
        describeKeyLimits(key.ceiling) ? h("div", { class: "ceiling" }, `ceiling: ${describeKeyLimits(key.ceiling)}`) : null),
      h("td", {}, key.is_operator_disabled ? `disabled by you${key.disabled_reason ? `: ${key.disabled_reason}` : ""}`
        : key.is_enabled ? "enabled" : "disabled by its owner"),
      h("td", { class: "row-actions" }, h("button", { type: "button", class: "toggle-key", onclick: () => this.toggleKey(key) },
        key.is_operator_disabled ? "Enable" : "Disable"))));
    return h("tr", { class: "key-list" }, h("td", { colSpan: 10 }, keys.length
      ? h("table", {}, h("tbody", {}, ...rows)) : "No keys."));
  }

  toggleKey(key) {
    const url = `/keys/${key.id}`;
    if (key.is_operator_disabled) {
      this.change("PATCH", url, { is_enabled: true }, `The key ${key.name} is enabled.`);
      return;
    }
    const reason = prompt(`Why disable the key ${key.name}? Its owner is shown this, and cannot enable it again.`, "");
    if (reason === null) return;
    this.change("PATCH", url, { is_enabled: false, disabled_reason: reason.trim() || null },
                `The key ${key.name} is disabled.`);
  }

  // --- plans ---

  renderPlans() {
    const rows = this.plans.map((plan) => {
      const url = `/plans/${encodeURIComponent(plan.name)}`;
      return h("tr", { "data-plan": plan.name },
        h("td", { "data-label": "Name" }, plan.name),
        h("td", { "data-label": "Limits" }, describePlanLimits(plan.limits)),
        h("td", { "data-label": "Accounts" }, String(plan.num_accounts)),
        h("td", { "data-label": "Default" }, plan.is_default ? h("span", { class: "badge on" }, "default")
          : h("button", { type: "button", class: "make-default",
                          onclick: () => this.change("PATCH", url, { is_default: true }) }, "Make default")),
        h("td", { class: "row-actions" },
          h("button", { type: "button", class: "edit-plan", onclick: () => this.editPlan(plan) }, "Edit"),
          h("button", { type: "button", class: "delete-plan danger", onclick: () => {
            if (confirm(`Delete the plan "${plan.name}"? Its accounts fall back to the default plan.`)) {
              this.change("DELETE", url);
            }
          } }, "Delete")));
    });
    $("#admin-plans tbody").replaceChildren(...(rows.length ? rows
      : [h("tr", {}, h("td", { colSpan: 5, class: "empty" }, "No plans yet: every account is unlimited."))]));
    const chosen = $("#invite-plan").value;
    $("#invite-plan").replaceChildren(h("option", { value: "" }, "the default plan"),
      ...this.plans.map((plan) => h("option", { value: plan.name, selected: plan.name === chosen }, plan.name)));
  }

  editPlan(plan) {
    this.editing = plan;
    $("#plan-form").reset();
    $("#plan-form-title").textContent = plan ? `Edit the plan ${plan.name}` : "New plan";
    $("#plan-save").textContent = plan ? "Save changes" : "Create plan";
    $("#plan-cancel").hidden = !plan;
    $("#plan-name").readOnly = Boolean(plan);
    if (!plan) return;
    $("#plan-name").value = plan.name;
    for (const input of document.querySelectorAll("#plan-form [data-limit]")) {
      input.value = plan.limits[input.dataset.limit] ?? "";
    }
    $("#plan-models").value = (plan.limits.models || []).join(", ");
    $("#plan-default").checked = plan.is_default;
    $("#plan-form").scrollIntoView({ block: "nearest" });
  }

  async savePlan() {
    const limits = Object.fromEntries(PLAN_LIMIT_NAMES.map((name) => {
      const value = $(`#plan-form [data-limit=${name}]`).value;
      return [name, value ? Number(value) : null];
    }));
    const models = $("#plan-models").value.split(",").map((model) => model.trim()).filter(Boolean);
    limits.models = models.length ? models : null;
    const isDefault = $("#plan-default").checked;
    const plan = this.editing;
    const saved = await this.change(plan ? "PATCH" : "POST", plan ? `/plans/${encodeURIComponent(plan.name)}` : "/plans",
      plan ? { limits, is_default: isDefault } : { name: $("#plan-name").value.trim(), limits, is_default: isDefault },
      plan ? `The plan ${plan.name} is saved: its accounts have the new limits from their next request.`
        : "The plan is created.");
    if (saved) this.editPlan(null);
  }

  // --- invitations ---

  async createInvite() {
    const body = { plan: $("#invite-plan").value || null, note: $("#invite-note").value.trim() || null,
                   expires_in_days: Number($("#invite-days").value) };
    await this.dashboard.guard(async () => {
      const created = await admin("POST", "/invites", body);
      $("#invite-code").textContent = created.code;
      $("#invite-code-card").hidden = false;
      $("#invite-note").value = "";
      await this.load();
    });
  }

  renderInvites(invites) {
    const now = Date.now();
    const rows = invites.slice().reverse().map((invite) => h("tr", { "data-invite-id": invite.id },
      h("td", { "data-label": "Note" }, invite.note || "—"),
      h("td", { "data-label": "Plan" }, invite.plan ?? "default"),
      h("td", { "data-label": "Created" }, formatDate(invite.created_at)),
      h("td", { "data-label": "Expires" }, formatDate(invite.expires_at)),
      h("td", { "data-label": "State" }, invite.used_at ? `used ${formatDate(invite.used_at)}`
        : Date.parse(invite.expires_at) <= now ? "expired" : "open")));
    $("#admin-invites tbody").replaceChildren(...(rows.length ? rows
      : [h("tr", {}, h("td", { colSpan: 5, class: "empty" }, "No invitations yet."))]));
  }
}
