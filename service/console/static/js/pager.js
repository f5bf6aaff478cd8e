// Search and paging over GET /adapters (a store may hold thousands): one page in memory at a time.

import { listAdapters } from "./api.js";
import { el } from "./dom.js";

export class AdapterPager {
  /**
   * @param {object} parts {search: input[type=search], prev: button, next: button, info: element}
   * @param {number} limit adapters per page
   * @param {(page: object) => void} render called with each page ({adapters, total, next_offset})
   * @param {(error: Error) => void} fail
   */
  constructor(parts, limit, render, fail) {
    Object.assign(this, parts);
    this.limit = limit;
    this.render = render;
    this.fail = fail;
    this.offset = 0;
    this.q = "";
    this.seq = 0;
    let timer = null;
    this.search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => this.load(0), 200);
    });
    this.prev.addEventListener("click", () => this.load(Math.max(0, this.offset - this.limit)));
    this.next.addEventListener("click", () => this.load(this.offset + this.limit));
  }

  /** Fetch the page at `offset` (default: the current one again); late answers to older queries are dropped. */
  async load(offset = this.offset) {
    const seq = ++this.seq;
    this.q = this.search.value.trim();
    try {
      const page = await listAdapters({ q: this.q, limit: this.limit, offset });
      if (seq !== this.seq) return;
      if (!page.adapters.length && offset > 0 && page.total > 0) {
        await this.load(Math.max(0, page.total - this.limit)); // the last page emptied (a delete): step back
        return;
      }
      this.offset = offset;
      this.total = page.total;
      const first = page.total ? offset + 1 : 0;
      const last = offset + page.adapters.length;
      this.info.textContent = page.total
        ? `${first}–${last} of ${page.total}${this.q ? ` matching “${this.q}”` : ""}`
        : this.q ? `no voice matches “${this.q}”` : "no voices stored yet";
      this.prev.disabled = offset === 0;
      this.next.disabled = page.next_offset === null;
      this.render(page);
    } catch (err) {
      if (seq === this.seq) this.fail(err);
    }
  }
}

/** The display name of an adapter: its name, else its label, then the id. */
export function adapterTitle(a) {
  return a.name || a.label || a.id;
}

export function adapterOption(a) {
  const index = a.has_index ? ", index" : "";
  return el("option", { value: a.id }, `${adapterTitle(a)} — ${a.id.slice(0, 8)} (rank ${a.rank}${index})`);
}
