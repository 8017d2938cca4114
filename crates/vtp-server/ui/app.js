// The VTP dashboard: the job list, a job's live curves and table, a form
// to upload a dataset and start a job. Plain DOM (every text the API sends
// goes in as text, never as HTML) over the backend's own API, charts by
// uPlot (vendored, see ui/vendor/README.md).
"use strict";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const MODELS = ["small_cnn", "resnet18", "resnet34", "mobilenet_v2", "yolo11n", "yolo11s", "yolov8n"];
const view = document.getElementById("view");
const notice = document.getElementById("notice");
let leaving = []; // what the current view must stop when another opens

// ---- helpers -----------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function token() {
  return localStorage.getItem("vtp-token") || "";
}

function headers(extra) {
  const out = Object.assign({}, extra || {});
  if (token()) out.Authorization = "Bearer " + token();
  return out;
}

function showNotice(message) {
  notice.textContent = message;
  notice.hidden = !message;
}

/** Calls the API; answers its JSON, or throws its error message. */
async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    if (response.status === 401) {
      showNotice("This backend needs a token: enter one above (vtp-backend token create --user NAME).");
    }
    const detail = data && data.error ? data.error.message : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return data;
}

function fmt(value, digits) {
  return typeof value === "number" ? value.toFixed(digits === undefined ? 4 : digits) : "";
}

/** A job's status; a job waiting for capacity with its place in the queue. */
function statusCell(status, job) {
  const place = job && job.queue_position ? ` #${job.queue_position}` : "";
  const title = place ? `waiting in the queue, place ${job.queue_position}` : status;
  return el("span", { class: `status ${status}`, title }, status + place);
}

function progressBar(progress) {
  return el("div", { class: "bar", title: `${Math.round(progress * 100)}%` },
    el("div", { style: `width:${Math.round(progress * 100)}%` }));
}

/** The one number a person looks for: mAP50-95 of a detector, else accuracy. */
function best(rows) {
  const pick = (name) => rows.map((r) => r[name]).filter((v) => typeof v === "number");
  const maps = pick("map");
  if (maps.length) return `mAP ${fmt(Math.max(...maps), 3)}`;
  const accuracies = pick("val_accuracy");
  if (accuracies.length) return `acc ${(100 * Math.max(...accuracies)).toFixed(1)}%`;
  return "";
}

/**
 * Follows a job's server-sent events: `fetch` with the token (EventSource
 * cannot send an Authorization header), the stream read line by line as
 * the SSE format defines (id, event, data fields; a blank line ends an
 * event). Reconnects with Last-Event-ID after a drop; stops at a final
 * status or when `stop()` is called.
 */
function followEvents(jobId, onEvent) {
  const controller = new AbortController();
  let lastId = null;
  let done = false;
  async function connect() {
    while (!done) {
      try {
        const extra = { Accept: "text/event-stream" };
        if (lastId !== null) extra["Last-Event-ID"] = lastId;
        const response = await fetch(`/training/jobs/${jobId}/events`, {
          headers: headers(extra), signal: controller.signal,
        });
        if (!response.ok) throw new Error(`events: ${response.status}`);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        let event = { id: null, name: "message", data: [] };
        for (;;) {
          const { value, done: ended } = await reader.read();
          if (ended) break;
          buffer += value;
          let newline;
          while ((newline = buffer.search(/\r?\n/)) >= 0) {
            const line = buffer.slice(0, newline);
            buffer = buffer.slice(newline + (buffer[newline] === "\r" ? 2 : 1));
            if (line === "") {
              if (event.data.length) {
                if (event.id !== null) lastId = event.id;
                const data = JSON.parse(event.data.join("\n"));
                onEvent(event.name, data);
                if (TERMINAL.has(data.job.status)) done = true;
              }
              event = { id: null, name: "message", data: [] };
            } else if (!line.startsWith(":")) {
              const colon = line.indexOf(":");
              const field = colon < 0 ? line : line.slice(0, colon);
              const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
              if (field === "id") event.id = text;
              else if (field === "event") event.name = text;
              else if (field === "data") event.data.push(text);
            }
          }
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        showNotice(`Event stream interrupted (${error.message}); reconnecting`);
      }
      if (!done) await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  connect();
  return () => { done = true; controller.abort(); };
}

// ---- the job list --------------------------------------------------------

async function listView() {
  const status = el("select", { id: "filter-status", "aria-label": "status" },
    ["", "pending", "queued", "running", "cancelling", "completed", "failed", "cancelled"]
      .map((s) => el("option", { value: s }, s || "any status")));
  const search = el("input", { id: "filter-text", placeholder: "model or user", "aria-label": "filter" });
  const body = el("tbody");
  const bestOf = new Map();
  view.replaceChildren(
    el("h1", {}, "Training jobs"),
    el("div", { class: "filters" }, status, search),
    el("table", { id: "jobs" },
      el("thead", {}, el("tr", {}, ["Job", "User", "Model", "Status", "Progress", "Best", "Created"].map((h) => el("th", {}, h)))),
      body));
  async function refresh() {
    const query = status.value ? `&status=${status.value}` : "";
    let page;
    try {
      page = await api("GET", `/training/jobs?limit=100${query}`);
    } catch (error) {
      showNotice(error.message);
      return;
    }
    const needle = search.value.trim().toLowerCase();
    const jobs = page.jobs.filter((job) => !needle
      || job.model_name.toLowerCase().includes(needle) || job.user_id.toLowerCase().includes(needle));
    body.replaceChildren(...jobs.map((job) => el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: `#/jobs/${job.id}` }, job.id.slice(0, 8))),
      el("td", {}, job.user_id),
      el("td", {}, `${job.model_name} (${job.framework})`),
      el("td", {}, statusCell(job.status, job)),
      el("td", {}, progressBar(job.progress)),
      el("td", { class: "best" }, bestOf.get(job.id) || ""),
      el("td", {}, new Date(job.created_at).toLocaleString()))));
    for (const job of jobs.slice(0, 50)) {
      if (bestOf.has(job.id) && TERMINAL.has(job.status)) continue;
      api("GET", `/training/jobs/${job.id}/metrics`).then((rows) => {
        bestOf.set(job.id, best(rows));
        const cell = body.querySelector(`tr[data-job="${job.id}"] td.best`);
        if (cell) cell.textContent = bestOf.get(job.id);
      }).catch(() => {});
    }
  }
  status.addEventListener("change", refresh);
  search.addEventListener("input", refresh);
  await refresh();
  const timer = setInterval(refresh, 5000);
  leaving.push(() => clearInterval(timer));
}

// ---- one job -------------------------------------------------------------

function chart(target, title, series) {
  const width = Math.max(360, target.clientWidth - 20);
  return new uPlot({
    title, width, height: 240,
    scales: { x: { time: false } },
    // Epochs are whole numbers: no ticks between them.
    axes: [{ label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, {}],
    series: [{ label: "epoch" }, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, points: { show: true } }))],
  }, [[], ...series.map(() => [])], target);
}

/**
 * The final checkpoint's validation per class, from its sidecar: each
 * class's accuracy (or a detector's mAP50-95) and a classifier's confusion
 * matrix (rows: the true class; columns: the predicted one).
 */
async function perClassView(job, target) {
  const file = (job.checkpoint_s3_uri || "").split("/").pop();
  if (!file.endsWith(".safetensors")) return;
  let meta;
  try {
    meta = await api("GET", `/training/jobs/${job.id}/checkpoint/${encodeURIComponent(file.replace(/\.safetensors$/, ".json"))}`);
  } catch (_) { return; /* a set without a sidecar of ours */ }
  const report = meta && meta.per_class;
  if (!report) return;
  const names = meta.class_names;
  const label = report.metric === "map" ? "mAP50-95" : "accuracy";
  const children = [
    el("h2", {}, `Per class (epoch ${meta.epoch})`),
    el("table", { id: "per-class" },
      el("thead", {}, el("tr", {}, el("th", {}, "class"), el("th", {}, label))),
      el("tbody", {}, ...names.map((name, i) => el("tr", {},
        el("td", {}, name), el("td", { class: "num" }, fmt(report.values[i])))))),
  ];
  if (report.confusion) {
    children.push(
      el("h2", {}, "Confusion matrix (rows: true class, columns: predicted)"),
      el("table", { id: "confusion", class: "confusion" },
        el("thead", {}, el("tr", {}, el("th", {}, ""), ...names.map((name) => el("th", {}, name)))),
        el("tbody", {}, ...report.confusion.map((row, i) => el("tr", {},
          el("th", {}, names[i]),
          ...row.map((count, j) => el("td", { class: i === j ? "num hit" : "num" }, String(count))))))));
  }
  target.replaceChildren(...children);
}

async function jobView(id) {
  let job;
  try {
    job = await api("GET", `/training/jobs/${id}`);
  } catch (error) {
    view.replaceChildren(el("p", { class: "error" }, error.message));
    return;
  }
  const statusEl = el("span", { id: "job-status", class: `status ${job.status}` }, job.status);
  const progressEl = el("span", { id: "job-progress" }, "");
  const messageEl = el("span", { id: "job-message" }, "");
  const errorEl = el("p", { id: "job-error", class: "error" }, "");
  const checkpointEl = el("span", { id: "job-checkpoint" });
  const cancel = el("button", { class: "danger", id: "cancel" }, "Cancel");
  const remove = el("button", { class: "danger", id: "delete" }, "Delete");
  const placeEl = el("span", { id: "job-place" }, "");
  const rowsBody = el("tbody");
  const lossBox = el("div", { class: "card", id: "loss-chart", "data-points": "0" });
  const qualityBox = el("div", { class: "card", id: "quality-chart", "data-points": "0" });
  const perClassBox = el("div", { id: "per-class-box" });
  let perClassShown = false;
  const detector = job.framework === "ultralytics";
  view.replaceChildren(
    el("h1", {}, `Job ${job.id}`),
    el("dl", { class: "meta" },
      el("dt", {}, "Status"), el("dd", {}, statusEl, " ", progressEl, " ", placeEl),
      el("dt", {}, "Priority"), el("dd", { id: "job-priority" }, String(job.priority ?? 0)),
      el("dt", {}, "Model"), el("dd", {}, `${job.model_name} (${job.framework})`),
      el("dt", {}, "Owner"), el("dd", {}, job.user_id),
      el("dt", {}, "Dataset"), el("dd", {}, job.dataset_s3_uri),
      el("dt", {}, "Message"), el("dd", {}, messageEl),
      el("dt", {}, "Checkpoint"), el("dd", {}, checkpointEl)),
    errorEl,
    el("div", { class: "actions" }, cancel, " ", remove),
    el("div", { class: "cards" }, lossBox, qualityBox),
    el("h2", {}, "Epochs"),
    el("table", { id: "epochs" }, el("thead", {}, el("tr", {}, ["Epoch", "loss", "val_loss", detector ? "mAP50" : "accuracy", detector ? "mAP50-95" : "images/s", "seconds"].map((h) => el("th", {}, h)))), rowsBody),
    perClassBox,
    el("h2", {}, "Config"),
    el("pre", { id: "job-config" }, JSON.stringify(job.config, null, 2)));
  const lossChart = chart(lossBox, "Loss", [["loss", "#2f6fde"], ["val_loss", "#e0862f"]]);
  const qualityChart = detector
    ? chart(qualityBox, "mAP", [["mAP50", "#23884a"], ["mAP50-95", "#8a3fd1"]])
    : chart(qualityBox, "Accuracy", [["val_accuracy", "#23884a"]]);
  const epochs = new Map();
  function redraw() {
    const rows = [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
    const xs = rows.map((r) => r.epoch);
    lossChart.setData([xs, rows.map((r) => r.loss ?? null), rows.map((r) => r.val_loss ?? null)]);
    qualityChart.setData(detector
      ? [xs, rows.map((r) => r.map50 ?? null), rows.map((r) => r.map ?? null)]
      : [xs, rows.map((r) => r.val_accuracy ?? null)]);
    lossBox.dataset.points = String(xs.length);
    qualityBox.dataset.points = String(xs.length);
    // Every redraw's point count, for the browser test: one more per epoch.
    lossBox.dataset.history = (lossBox.dataset.history ? lossBox.dataset.history + "," : "") + xs.length;
    rowsBody.replaceChildren(...rows.map((r) => el("tr", {},
      el("td", { class: "num" }, r.epoch),
      el("td", { class: "num" }, fmt(r.loss)),
      el("td", { class: "num" }, fmt(r.val_loss)),
      el("td", { class: "num" }, detector ? fmt(r.map50) : fmt(r.val_accuracy)),
      el("td", { class: "num" }, detector ? fmt(r.map) : fmt(r.images_per_second, 1)),
      el("td", { class: "num" }, fmt(r.epoch_seconds, 1)))));
  }
  function show(current) {
    job = current;
    statusEl.textContent = job.status;
    statusEl.className = `status ${job.status}`;
    progressEl.textContent = `${Math.round(job.progress * 100)}%`;
    messageEl.textContent = job.message || "";
    errorEl.textContent = job.error || "";
    cancel.disabled = TERMINAL.has(job.status) || job.status === "cancelling";
    remove.hidden = !TERMINAL.has(job.status);
    // Events carry the job, not its place in the queue: the poll below does.
    if (job.queue_position) placeEl.textContent = `(place ${job.queue_position} in the queue)`;
    else if (job.status !== "queued" || job.launched_at) placeEl.textContent = "";
    if (job.status === "completed" && job.checkpoint_s3_uri && !perClassShown) {
      perClassShown = true;
      perClassView(job, perClassBox);
    }
    if (job.checkpoint_s3_uri && !checkpointEl.firstChild) {
      checkpointEl.replaceChildren(el("a", { href: "#", id: "download", onclick: (e) => { e.preventDefault(); download(job.id); } }, "download best.safetensors"));
    }
  }
  cancel.addEventListener("click", async () => {
    try { show(await api("DELETE", `/training/jobs/${id}`)); } catch (error) { showNotice(error.message); }
  });
  remove.addEventListener("click", async () => {
    if (!confirm("Delete this job, its checkpoints and its metrics?")) return;
    try {
      await api("DELETE", `/training/jobs/${id}?purge=true`);
      location.hash = "#/";
    } catch (error) { showNotice(error.message); }
  });
  show(job);
  // While it waits for capacity, its place in the queue moves.
  const placeTimer = setInterval(async () => {
    if (job.status !== "queued" || job.launched_at) return;
    try { show(await api("GET", `/training/jobs/${id}`)); } catch (_) { /* the stream shows errors */ }
  }, 3000);
  leaving.push(() => clearInterval(placeTimer));
  const stop = followEvents(id, (kind, event) => {
    show(event.job);
    if (kind === "metrics" && event.metrics) {
      epochs.set(event.metrics.epoch, event.metrics);
      redraw();
    }
  });
  leaving.push(stop);
}

/** Downloads the checkpoint with the token (a plain link cannot send it). */
async function download(id) {
  const response = await fetch(`/training/jobs/${id}/checkpoint`, { headers: headers() });
  if (!response.ok) { showNotice(`download: ${response.status}`); return; }
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: "best.safetensors" });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---- a new job -----------------------------------------------------------

function newView() {
  const form = el("form", { class: "new", id: "new-job" },
    el("label", { for: "f-file" }, "Dataset archive (zip, tar, tar.gz)"), el("input", { id: "f-file", type: "file", required: "" }),
    el("label", { for: "f-name" }, "Dataset name"), el("input", { id: "f-name", required: "", value: "dataset" }),
    el("label", { for: "f-user" }, "User (without a token)"), el("input", { id: "f-user", value: "default" }),
    el("label", { for: "f-model" }, "Model"), el("select", { id: "f-model" }, MODELS.map((m) => el("option", { value: m }, m))),
    el("label", { for: "f-framework" }, "Framework"), el("select", { id: "f-framework" }, ["tch", "ultralytics"].map((f) => el("option", { value: f }, f))),
    el("label", { for: "f-epochs" }, "Epochs"), el("input", { id: "f-epochs", type: "number", min: "1", value: "10" }),
    el("label", { for: "f-config" }, "More config (JSON)"), el("input", { id: "f-config", value: "{}" }),
    el("span"), el("button", { type: "submit", id: "f-submit" }, "Upload and start"));
  const status = el("p", { id: "new-status" });
  view.replaceChildren(el("h1", {}, "Upload a dataset and start a job"), form, status);
  const model = form.querySelector("#f-model");
  model.addEventListener("change", () => {
    form.querySelector("#f-framework").value = model.value.startsWith("yolo") ? "ultralytics" : "tch";
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const user = token() ? null : form.querySelector("#f-user").value.trim();
      const data = new FormData();
      if (user) data.append("user_id", user);
      data.append("dataset_name", form.querySelector("#f-name").value.trim());
      data.append("file", form.querySelector("#f-file").files[0]);
      status.textContent = "uploading...";
      const uploaded = await api("POST", "/datasets/upload", data);
      const config = Object.assign(JSON.parse(form.querySelector("#f-config").value || "{}"),
        { epochs: Number(form.querySelector("#f-epochs").value) });
      const job = await api("POST", "/training/jobs", {
        user_id: user || "", model_name: model.value,
        framework: form.querySelector("#f-framework").value,
        dataset_s3_uri: uploaded.s3_uri, config,
      });
      await api("POST", `/training/jobs/${job.id}/start`);
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      status.textContent = "";
      showNotice(error.message);
    }
  });
}

// ---- routing -------------------------------------------------------------

function route() {
  for (const stop of leaving) stop();
  leaving = [];
  showNotice("");
  const hash = location.hash || "#/";
  const job = hash.match(/^#\/jobs\/([0-9a-f-]{36})$/);
  if (job) jobView(job[1]);
  else if (hash === "#/new") newView();
  else listView();
}

document.getElementById("token").value = token();
document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem("vtp-token", document.getElementById("token").value.trim());
  route();
});
window.addEventListener("hashchange", route);
route();
