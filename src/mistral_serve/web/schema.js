// Parameter controls rendered from a model's `json_request_schema`: a slider and a number box for a
// bounded number, a number box for an unbounded one, a toggle for a boolean, a list for stop
// sequences, a text box for a string, a JSON box for anything else. Only values that differ from
// the schema's default are kept, so a request carries exactly the parameters the user changed.

import { h } from "./dom.js";

// fields the workbench sets itself (the conversation, streaming) or shows one of (n: one answer)
const NOT_PARAMETERS = new Set(["model", "messages", "stream", "stream_options", "n"]);
const MAX_SLIDER_RANGE = 1e6;

export function parameterSpecs(schema) {
  const specs = [];
  for (const [name, property] of Object.entries(schema?.properties || {})) {
    if (!NOT_PARAMETERS.has(name)) specs.push(specOf(name, property));
  }
  return specs;
}

function specOf(name, property) {
  const branches = (property.anyOf || property.oneOf || [property]).filter((b) => b.type !== "null");
  const spec = { name, title: property.title || name, description: property.description || "",
                 default: property.default ?? null, kind: "json" };
  const [only] = branches;
  if (branches.length === 1 && (only.type === "number" || only.type === "integer")) {
    const isInteger = only.type === "integer";
    const step = isInteger ? 1 : 0.01;
    const min = only.minimum ?? (only.exclusiveMinimum !== undefined ? only.exclusiveMinimum + step : null);
    const max = only.maximum ?? (only.exclusiveMaximum !== undefined ? only.exclusiveMaximum - step : null);
    const isBounded = min !== null && max !== null && max - min <= MAX_SLIDER_RANGE;
    Object.assign(spec, { kind: isBounded ? "range" : "number", min, max, step, isInteger });
  } else if (branches.length === 1 && only.type === "boolean") {
    spec.kind = "boolean";
  } else if (branches.some((b) => b.type === "array" && b.items?.type === "string")) {
    spec.kind = "stops";
    spec.maxItems = branches.find((b) => b.type === "array").maxItems ?? 4;
  } else if (branches.length === 1 && only.type === "string" && !only.enum) {
    spec.kind = "text";
  }
  return spec;
}

// A number within the spec's bounds, or undefined for "not set".
export function clamp(spec, value) {
  if (value === "" || value === null || value === undefined || Number.isNaN(Number(value))) return undefined;
  let number = Number(value);
  if (spec.isInteger) number = Math.round(number);
  if (spec.min !== null && number < spec.min) number = spec.min;
  if (spec.max !== null && number > spec.max) number = spec.max;
  return number;
}

// `params` without the names this model does not declare, numbers clamped to its bounds.
export function fitParams(specs, params) {
  const fitted = {};
  for (const spec of specs) {
    if (!(spec.name in params)) continue;
    const value = spec.kind === "range" || spec.kind === "number" ? clamp(spec, params[spec.name]) : params[spec.name];
    if (value !== undefined && JSON.stringify(value) !== JSON.stringify(spec.default)) fitted[spec.name] = value;
  }
  return fitted;
}

// Renders the controls into `container`; `onChange()` runs after `params` (mutated) changes.
export function renderParams(container, specs, params, onChange) {
  const set = (spec, value) => {
    if (value === undefined || JSON.stringify(value) === JSON.stringify(spec.default)) delete params[spec.name];
    else params[spec.name] = value;
    onChange();
  };
  const main = specs.filter((s) => s.kind !== "json" && s.kind !== "text");
  const more = specs.filter((s) => s.kind === "json" || s.kind === "text");
  container.replaceChildren(
    ...main.map((spec) => control(spec, params, set)),
    more.length ? h("details", { class: "more" }, h("summary", {}, "More parameters"),
                    ...more.map((spec) => control(spec, params, set))) : null,
  );
}

function control(spec, params, set) {
  const id = `param-${spec.name}-${Math.random().toString(36).slice(2, 8)}`;
  const value = params[spec.name];
  const body = BUILDERS[spec.kind](spec, value, (v) => set(spec, v), id);
  const reset = h("button", { type: "button", class: "reset", title: "Back to the default",
                              "aria-label": `Reset ${spec.title}`,
                              onclick: () => { set(spec, undefined); wrapper.replaceWith(control(spec, params, set)); } },
                  "↺");
  const defaultText = spec.default === null ? "not set" : JSON.stringify(spec.default);
  const wrapper = h("div", { class: `param ${spec.kind}`, "data-param": spec.name },
    h("div", { class: "param-head" },
      h("label", { for: id, title: spec.description }, spec.name),
      h("span", { class: "default" }, `default ${defaultText}`), reset),
    body);
  return wrapper;
}

const BUILDERS = {
  range(spec, value, set, id) {
    const shown = value ?? spec.default;
    const box = h("input", { id, class: "value", type: "number", min: spec.min, max: spec.max, step: spec.step,
                             value: shown ?? "", placeholder: "not set" });
    const slider = h("input", { class: "slider", type: "range", min: spec.min, max: spec.max, step: spec.step,
                                value: shown ?? spec.min, "aria-label": `${spec.name} slider` });
    slider.addEventListener("input", () => { box.value = slider.value; set(clamp(spec, slider.value)); });
    box.addEventListener("input", () => {
      const number = clamp(spec, box.value);
      if (number !== undefined) slider.value = number;
      set(number);
    });
    box.addEventListener("change", () => {  // on leaving the box, show the value actually used
      const number = clamp(spec, box.value);
      box.value = number ?? "";
    });
    return h("div", { class: "range-row" }, slider, box);
  },
  number(spec, value, set, id) {
    const box = h("input", { id, class: "value", type: "number", step: spec.step, min: spec.min ?? false,
                             max: spec.max ?? false, value: value ?? spec.default ?? "", placeholder: "not set" });
    box.addEventListener("input", () => set(clamp(spec, box.value)));
    box.addEventListener("change", () => { box.value = clamp(spec, box.value) ?? ""; });
    return box;
  },
  boolean(spec, value, set, id) {
    const box = h("input", { id, class: "toggle", type: "checkbox", role: "switch", checked: Boolean(value ?? spec.default) });
    box.addEventListener("change", () => set(box.checked));
    return box;
  },
  stops(spec, value, set) {
    const list = h("div", { class: "stops" });
    const read = () => {
      const stops = [...list.querySelectorAll("input")].map((input) => unescape(input.value)).filter(Boolean);
      set(stops.length ? stops : undefined);
    };
    const row = (text) => {
      const input = h("input", { value: escape(text), placeholder: "stop sequence (\\n: a newline)",
                                 "aria-label": "stop sequence", oninput: read });
      return h("div", { class: "stop" }, input,
               h("button", { type: "button", "aria-label": "Remove stop sequence",
                             onclick: (event) => { event.target.parentElement.remove(); read(); } }, "×"));
    };
    const stops = typeof value === "string" ? [value] : value || [];
    list.append(...stops.map(row));
    const add = h("button", { type: "button", class: "add-stop", onclick: () => {
      if (list.children.length < spec.maxItems) list.append(row(""));
      list.lastElementChild?.querySelector("input").focus();
    } }, "Add stop sequence");
    return h("div", {}, list, add);
  },
  text(spec, value, set, id) {
    return h("input", { id, value: value ?? "", placeholder: "not set", oninput: (e) => set(e.target.value || undefined) });
  },
  json(spec, value, set, id) {
    const area = h("textarea", { id, rows: 2, class: "json", spellcheck: false, placeholder: "JSON, e.g. {\"0\": -100}",
                                 value: value === undefined ? "" : JSON.stringify(value) });
    area.addEventListener("input", () => {
      if (!area.value.trim()) { area.removeAttribute("aria-invalid"); set(undefined); return; }
      try {
        set(JSON.parse(area.value));
        area.removeAttribute("aria-invalid");
      } catch {
        area.setAttribute("aria-invalid", "true");
      }
    });
    return area;
  },
};

const escape = (text) => text.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\t/g, "\\t");
const unescape = (text) => text.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
