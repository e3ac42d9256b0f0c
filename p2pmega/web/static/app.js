// The page of `p2pmega ui`: share, fetch and my files over the app's JSON API on this machine.
// Text from the server only ever goes into the page as text (textContent), never as markup.
"use strict";

const POLL_MS = 250;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(method, url, body) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let doc = null;
  try {
    doc = await response.json();
  } catch (_) {
    doc = null;
  }
  if (!response.ok) throw new Error((doc && doc.error) || `${response.status} ${response.statusText}`);
  return doc;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function waitForJob(id, onProgress) {
  for (;;) {
    const job = await api("GET", `/api/jobs/${id}`);
    if (job.state !== "running") return job;
    onProgress(job.done, job.total);
    await sleep(POLL_MS);
  }
}

function formatBytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

function formatDuration(s) {
  if (s === null || s === undefined) return "?";
  if (s >= 86400) return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  if (s >= 3600) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.max(0, Math.floor(s / 60))}m`;
}

function copyButton(text) {
  const button = el("button", { type: "button", class: "copy" }, "copy link");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "copied";
    } catch (_) {
      button.textContent = "copy failed: select the link";
    }
    setTimeout(() => (button.textContent = "copy link"), 2000);
  });
  return button;
}

// A card per share or fetch: a title, a progress bar, a status line, then the outcome.
function card(container, title) {
  const bar = el("progress", { max: "1", value: "0" });
  const status = el("p", { class: "status" }, "starting…");
  const body = el("div", { class: "outcome" });
  const node = el("article", { class: "job" }, el("h3", {}, title), bar, status, body);
  container.prepend(node);
  return {
    node,
    body,
    progress(label, done, total) {
      bar.max = total > 0 ? total : 1;
      bar.value = total > 0 ? done : 0;
      status.textContent = total > 0 ? `${label}: ${formatBytes(done)} of ${formatBytes(total)}` : `${label}…`;
    },
    done(text) {
      bar.max = 1;
      bar.value = 1;
      status.textContent = text;
      node.classList.add("done");
    },
    fail(message) {
      bar.remove();
      status.textContent = message;
      status.className = "error";
      node.classList.add("failed");
    },
  };
}

// --- share ---

function upload(file, view) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/share?name=${encodeURIComponent(file.name)}`);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => view.progress("reading the file", e.loaded, e.total));
    xhr.addEventListener("load", () => {
      const doc = xhr.response;
      if (xhr.status === 200 && doc && doc.job) resolve(doc.job);
      else reject(new Error((doc && doc.error) || `upload failed (${xhr.status})`));
    });
    xhr.addEventListener("error", () => reject(new Error("the upload to p2pmega failed (is p2pmega ui still running?)")));
    xhr.send(file);
  });
}

function showShared(view, jobId, result) {
  const link = el("input", { class: "link", type: "text", readonly: "", value: result.link, "aria-label": "read link" });
  link.addEventListener("focus", () => link.select());
  const countries = Object.entries(result.countries).map(([cc, n]) => `${cc}: ${n}`).join(" · ");
  const rows = result.chunks.map((c) =>
    el("li", {}, `${c.kind} ${c.index}: ${c.countries.join(", ")}` + (c.blocs.length ? ` (blocs: ${c.blocs.join(", ")})` : "")),
  );
  view.body.append(
    el("div", { class: "linkrow" }, link, copyButton(result.link)),
    el("div", { class: "shared" },
      el("img", { class: "qr", src: `/api/jobs/${jobId}/qr.svg`, alt: "QR code of the read link" }),
      el("div", {},
        el("p", {}, `Chunks by country (each chunk on at least two): ${countries}`),
        el("details", {}, el("summary", {}, `where each of the ${result.chunks.length} chunks lives`), el("ul", {}, ...rows)))),
  );
}

let limits = null;

async function shareOne(file) {
  const view = card(document.getElementById("share-jobs"), file.name);
  try {
    limits = limits || (await api("GET", "/api/limits"));
    if (file.size > limits.max_upload_bytes) {
      throw new Error(
        `${formatBytes(file.size)} is over this app's limit of ${formatBytes(limits.max_upload_bytes)} ` +
          "(p2pmega ui --max-upload); share it with p2pmega share FILE",
      );
    }
    const jobId = await upload(file, view);
    const job = await waitForJob(jobId, (done, total) => view.progress("encrypting and placing", done, total));
    if (job.state !== "done") throw new Error(job.error);
    const r = job.result;
    const how = r.status === "unchanged" ? "already shared" : `shared as ${r.chunk_count} data chunks`;
    view.done(`${formatBytes(r.size)} ${how}`);
    showShared(view, jobId, r);
    loadFiles();
  } catch (err) {
    view.fail(err.message);
  }
}

let shareQueue = Promise.resolve();
function shareFiles(files) {
  for (const file of files) shareQueue = shareQueue.then(() => shareOne(file));
}

// --- fetch ---

// The job finds the file's manifest; the page then starts the browser's download, which the app streams as the
// chunks arrive, and follows the job (its progress, or the error that cut the download short) to its end.
async function fetchLink(link) {
  const view = card(document.getElementById("fetch-jobs"), "fetching a link");
  try {
    const { job: jobId } = await api("POST", "/api/fetch", { link });
    let started = false;
    for (;;) {
      const job = await api("GET", `/api/jobs/${jobId}`);
      if (job.state === "failed") throw new Error(job.error);
      const r = job.result;
      if (r && !started) {
        started = true;
        view.node.querySelector("h3").textContent = r.name;
        const save = el("a", { href: r.download, download: r.name }, r.name);
        view.body.append(save);
        save.click();
        save.remove();
      }
      if (job.state === "done") {
        view.done(`${formatBytes(r.size)} fetched, verified and handed to your browser, which saves it`);
        return;
      }
      view.progress(started ? "downloading and decrypting" : "finding the file", job.done, job.total);
      await sleep(POLL_MS);
    }
  } catch (err) {
    view.fail(err.message);
  }
}

// --- my files ---

async function loadFiles() {
  const tbody = document.querySelector("#files-table tbody");
  const status = document.getElementById("files-status");
  let files;
  try {
    files = await api("GET", "/api/files");
  } catch (err) {
    status.textContent = err.message;
    return;
  }
  tbody.replaceChildren();
  if (files.length === 0) {
    status.textContent = "Nothing shared from this data dir yet.";
    return;
  }
  status.textContent = "checking every file's holders…";
  const cells = new Map();
  for (const f of files) {
    const health = el("td", { class: "health checking" }, "checking…");
    const lease = el("td", {}, "");
    const countries = el("td", {}, "");
    const keep = el("button", { type: "button", class: "keep" }, "keep alive");
    keep.addEventListener("click", () => keepAlive(f, keep));
    const drop = el("button", { type: "button", class: "forget" }, "forget");
    drop.addEventListener("click", () => forgetFile(f, row));
    const row = el("tr", { "data-root": f.root },
      el("td", { class: "name" }, f.name || "(no name)"),
      el("td", {}, formatBytes(f.size)),
      el("td", {}, new Date(f.shared_at * 1000).toLocaleString()),
      health, lease, countries,
      el("td", { class: "actions" }, copyButton(f.link), keep, drop));
    tbody.append(row);
    cells.set(f.root, { health, lease, countries });
  }
  try {
    const found = await api("GET", "/api/files/health");
    for (const h of found) {
      const c = cells.get(h.root);
      if (!c) continue;
      let text = h.health;
      if (h.health === "short") text += h.countries_unknown ? " (countries unknown)" : ` (${h.chunks_short} of ${h.chunks} chunks)`;
      if (h.health === "missing") text += h.problem ? ` (${h.problem})` : ` (${h.chunks_missing} of ${h.chunks} chunks)`;
      c.health.textContent = text;
      c.health.className = `health ${h.health}`;
      c.lease.textContent = formatDuration(h.lease_left_s);
      c.countries.textContent = h.countries.join(", ");
    }
    status.textContent = "";
  } catch (err) {
    status.textContent = `could not check the files: ${err.message}`;
    for (const c of cells.values()) c.health.textContent = "?";
  }
}

async function keepAlive(file, button) {
  const status = document.getElementById("files-status");
  button.disabled = true;
  button.textContent = "renewing…";
  try {
    const r = await api("POST", `/api/files/${file.root}/keep-alive`);
    await loadFiles();
    status.textContent = `${file.name || "file"}: renewed ${r.renewed} leases on its ${r.chunks} chunks`;
  } catch (err) {
    status.textContent = err.message;
    button.disabled = false;
    button.textContent = "keep alive";
  }
}

async function forgetFile(file, row) {
  const ok = window.confirm(
    `Forget ${file.name || "this file"}? It leaves this list and is no longer kept alive from here, and its key ` +
      "is deleted from this computer's data dir: keep its link if you may want the file again. " +
      "Its holders keep the encrypted chunks until their leases end, and its link keeps working until then.",
  );
  if (!ok) return;
  try {
    await api("POST", `/api/files/${file.root}/forget`);
    row.remove();
  } catch (err) {
    document.getElementById("files-status").textContent = err.message;
  }
}

// --- wiring ---

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("share-file");
  input.addEventListener("change", () => {
    shareFiles([...input.files]);
    input.value = "";
  });
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    if (e.dataTransfer && e.dataTransfer.files.length) shareFiles([...e.dataTransfer.files]);
  });
  const form = document.getElementById("fetch-form");
  const link = document.getElementById("fetch-link");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = link.value.trim();
    if (!text) return;
    link.value = "";
    fetchLink(text);
  });
  document.getElementById("files-refresh").addEventListener("click", loadFiles);
  loadFiles();
});
