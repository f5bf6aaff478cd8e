// Conversion parameters, built from the server's own contract: names, ranges, defaults and choices are read
// from the ConvertForm schema in /openapi.json (and the f0 methods this server runs from /model), so the page
// cannot drift from the API. Field names are RVC's; the labels in front of them are for people.

import { el } from "./dom.js";

const SKIP = new Set(["audio", "adapter"]); // chosen elsewhere on the page
const LABELS = {
  f0_up_key: ["Pitch shift", "semitones"],
  f0_method: ["Pitch extraction", ""],
  index_rate: ["Index rate", ""],
  filter_radius: ["Filter radius", ""],
  rms_mix_rate: ["Volume envelope mix", ""],
  protect: ["Protect consonants", ""],
  resample_sr: ["Resample to", "Hz"],
  format: ["Output format", ""],
  seed: ["Seed", ""],
  sid: ["Speaker id", ""],
};
const ORDER = ["f0_up_key", "f0_method", "index_rate", "protect", "rms_mix_rate", "filter_radius", "resample_sr",
  "format", "seed", "sid"];

/** The non-null branch of `anyOf: [X, {type: null}]`, and whether null is allowed. */
function unwrap(schema) {
  if (!schema.anyOf) return [schema, false];
  const real = schema.anyOf.find((s) => s.type !== "null") || {};
  return [{ ...real, description: schema.description, default: schema.default, title: schema.title }, true];
}

function resolveRef(openapi, schema) {
  if (!schema || !schema.$ref) return schema;
  return schema.$ref.split("/").slice(1).reduce((node, part) => node[part], openapi);
}

/** The ConvertForm schema from the OpenAPI document. */
export function convertSchema(openapi) {
  const body = openapi.paths["/convert"].post.requestBody.content["multipart/form-data"].schema;
  return resolveRef(openapi, body);
}

export class ParamsForm {
  /**
   * @param {HTMLElement} container where the fields go
   * @param {object} schema ConvertForm
   * @param {object} model GET /model (f0 methods available here, speaker count)
   */
  constructor(container, schema, model) {
    this.container = container;
    this.fields = new Map(); // name -> {spec, nullable, input, range}
    const names = Object.keys(schema.properties).filter((n) => !SKIP.has(n));
    names.sort((a, b) => (ORDER.indexOf(a) + 1 || 99) - (ORDER.indexOf(b) + 1 || 99));
    container.replaceChildren();
    for (const name of names) {
      if (name === "sid" && model && model.n_speakers <= 1) continue; // one speaker: nothing to choose
      container.append(this.#field(name, schema.properties[name], model));
    }
  }

  #field(name, raw, model) {
    const [spec, nullable] = unwrap(raw);
    const [label, unit] = LABELS[name] || [raw.title || name, ""];
    const id = `param-${name}`;
    const hint = spec.description || "";
    const wrap = el("div", { class: "field", "data-param": name });
    const title = el("label", { for: id }, label, unit ? el("span", { class: "dim" }, ` (${unit})`) : "", " ",
      el("code", {}, name));
    wrap.append(title);
    let input;
    let range = null;
    if (spec.enum || spec.const) {
      let choices = spec.enum || [spec.const];
      if (name === "f0_method" && model && model.f0_methods) {
        const here = choices.filter((c) => model.f0_methods.includes(c));
        choices = here.length ? here : choices;
      }
      input = el("select", { id, name });
      if (nullable && (spec.default === undefined || spec.default === null)) {
        // absent means the server's choice: say which one it is when /model tells
        const serverDefault = name === "f0_method" && model ? model.default_f0_method : null;
        input.append(el("option", { value: "" }, serverDefault ? `default (${serverDefault})` : "server default"));
      }
      for (const c of choices) input.append(el("option", { value: c }, c));
      const initial = choices.includes(spec.default) ? spec.default : input.options[0].value;
      input.value = initial;
      input.dataset.default = initial;
    } else if (spec.type === "integer" || spec.type === "number") {
      const step = spec.type === "integer" ? 1 : 0.01;
      let max = spec.maximum;
      if (name === "sid" && model) max = Math.min(max, model.n_speakers - 1);
      const attrs = { id, name, type: "number", step, min: spec.minimum, max, inputmode: "decimal" };
      if (hint) attrs["aria-describedby"] = `${id}-hint`;
      input = el("input", attrs);
      if (nullable) input.placeholder = "random";
      input.dataset.default = spec.default ?? "";
      input.value = spec.default ?? "";
      const bounded = spec.minimum !== undefined && max !== undefined && max - spec.minimum <= 100 && !nullable;
      if (bounded && name !== "resample_sr") {
        range = el("input", { type: "range", min: spec.minimum, max, step, value: input.value, "aria-hidden": "true",
          tabindex: "-1" });
        range.addEventListener("input", () => { input.value = range.value; });
        input.addEventListener("input", () => { range.value = input.value; });
      }
    } else {
      input = el("input", { id, name, type: "text" });
      input.dataset.default = spec.default ?? "";
      input.value = spec.default ?? "";
    }
    const row = el("div", { class: "control" }, ...(range ? [range] : []), input);
    wrap.append(row);
    const bounds = spec.minimum !== undefined ? `${spec.minimum} … ${spec.maximum}` : "";
    const def = spec.default !== undefined && spec.default !== null ? `default ${spec.default}` : "";
    wrap.append(el("p", { class: "hint", id: `${id}-hint` }, [hint, bounds, def].filter(Boolean).join(" · ")));
    this.fields.set(name, { spec, nullable, input, range });
    return wrap;
  }

  /** Form fields that differ from the defaults (sent as strings; empty optional ones left out). */
  values() {
    const out = {};
    for (const [name, { input }] of this.fields) {
      const value = input.value.trim();
      if (value === "") continue;
      out[name] = value;
    }
    return out;
  }

  /** Short text of the settings that differ from the defaults, for result labels. */
  summary() {
    const parts = [];
    for (const [name, { input }] of this.fields) {
      if (input.value.trim() !== String(input.dataset.default)) parts.push(`${name}=${input.value.trim() || "–"}`);
    }
    return parts.length ? parts.join(" · ") : "defaults";
  }

  reset() {
    for (const { input, range } of this.fields.values()) {
      input.value = input.dataset.default;
      if (range) range.value = input.value;
    }
  }

  /** Check the native constraints; report the first invalid field. */
  validate() {
    for (const { input } of this.fields.values()) {
      if (!input.checkValidity()) {
        input.reportValidity();
        return false;
      }
    }
    return true;
  }
}
