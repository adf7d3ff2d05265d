/* Conveyor's live job pages, for the admin and for a job's owner (no build step, no dependencies).
 *
 * [data-job-live]      one job, followed over its event stream (GET /api/jobs/<id>/stream/, the session
 *                      cookie): status, progress, log, an AI job's text, and its timeline (re-read from
 *                      /api/jobs/<id>/events/ at each status change). A dropped stream is opened again
 *                      from the last log byte shown.
 * [data-job-list-live] the admin's job list: the statuses and progress of the jobs it shows, polled in
 *                      one request (/jobs/statuses/?ids=...).
 *
 * Everything a job produced (log, text, messages, errors) is hostile: it goes in as text, never as HTML.
 */
"use strict";

(() => {
  const POLL_MS = 1500;
  const RETRY_MS = 1000;
  const MAX_RETRY_MS = 15000;
  const encoder = new TextEncoder();
  const byteLength = (text) => encoder.encode(text).length;

  // A status as Django labels it (TextChoices: "timed_out" -> "Timed Out"), for the admin's own fields.
  const label = (status) =>
    status
      .split("_")
      .map((word) => word.charAt(0).toUpperCase() + word.slice(1))
      .join(" ");

  // `<progress> N%`, as the admin's progress column and field show it.
  function renderProgress(cell, percent, message) {
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = percent;
    bar.title = message || "";
    cell.replaceChildren(bar, ` ${percent}%`);
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then((response) => {
      if (!response.ok) throw new Error(`${url}: ${response.status}`);
      return response.json();
    });
  }

  class JobView {
    constructor(root) {
      this.root = root;
      this.el = {};
      for (const node of root.querySelectorAll("[data-live]")) this.el[node.dataset.live] = node;
      this.streamUrl = root.dataset.streamUrl;
      this.eventsUrl = root.dataset.eventsUrl;
      this.logEnd = 0; // bytes of the log shown: where a new stream starts
      this.textAttempt = 0;
      this.textBytes = 0;
      this.shownEvents = this.el.timeline ? this.el.timeline.rows.length : 0;
      this.finished = false;
      this.retryMs = RETRY_MS;
      this.reading = false;
      this.readAgain = false;
    }

    connect() {
      const source = new EventSource(`${this.streamUrl}?offset=${this.logEnd}`);
      const on = (name, handle) =>
        source.addEventListener(name, (event) => handle.call(this, JSON.parse(event.data), source));
      on("status", this.onStatus);
      on("progress", (data) => this.setProgress(data.progress, data.message));
      on("log", this.onLog);
      on("text", this.onText);
      on("end", this.onEnd);
      source.onopen = () => {
        this.retryMs = RETRY_MS;
        this.setConnection("live");
      };
      source.onerror = () => {
        // The browser would reconnect from the log's start: close, and reopen from the last byte shown.
        source.close();
        if (this.finished) return;
        this.setConnection("reconnecting");
        setTimeout(() => this.connect(), this.retryMs);
        this.retryMs = Math.min(this.retryMs * 2, MAX_RETRY_MS);
      };
    }

    onStatus(data) {
      if ("progress" in data) {
        this.applySnapshot(data); // the job as the stream read it, first thing
      } else {
        this.setStatus(data.status);
        if (data.status === "running") this.setProgress(0, ""); // a new attempt starts from nothing
      }
      this.readTimeline();
    }

    onEnd(data, source) {
      this.finished = true;
      source.close();
      this.applySnapshot(data);
      this.setConnection("finished");
      this.readTimeline();
    }

    onLog(data) {
      const log = this.el.log;
      if (!log || data.offset < this.logEnd) return; // shown already (before a reconnection)
      const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(data.text); // a Text node
      this.logEnd = data.offset + byteLength(data.text);
      if (atBottom) log.scrollTop = log.scrollHeight;
    }

    onText(data) {
      const text = this.el.text;
      if (!text || data.attempt < this.textAttempt) return;
      if (data.attempt > this.textAttempt || data.offset === 0) {
        text.textContent = ""; // a new attempt, or the text so far from its start
        this.textAttempt = data.attempt;
        this.textBytes = 0;
      }
      if (data.offset < this.textBytes) return;
      text.append(data.delta);
      this.textBytes = data.offset + byteLength(data.delta);
    }

    applySnapshot(job) {
      this.setStatus(job.status);
      this.setProgress(job.progress, job.progress_message);
      this.setError(job.error);
      if (this.el.text && job.result && typeof job.result.text === "string") this.el.text.textContent = job.result.text;
    }

    setStatus(status) {
      this.root.dataset.status = status;
      if (this.el.status) this.el.status.textContent = status;
      this.mirror("status", (field) => {
        field.textContent = label(status);
      });
    }

    setProgress(progress, message) {
      const percent = Math.round(Number(progress) || 0);
      if (this.el.progress) this.el.progress.value = percent;
      if (this.el.percent) this.el.percent.textContent = `${percent}%`;
      if (this.el["progress-message"]) this.el["progress-message"].textContent = message || "";
      this.mirror("progress_bar", (field) => renderProgress(field, percent, message));
      this.mirror("progress_message", (field) => {
        field.textContent = message || "-";
      });
    }

    setError(error) {
      if (!this.el.error) return;
      this.el.error.hidden = !error;
      this.el.error.textContent = error ? `${error.type}: ${error.message}` : "";
    }

    setConnection(state) {
      if (!this.el.connection) return;
      this.el.connection.dataset.state = state;
      this.el.connection.textContent = state === "live" ? "(live)" : state === "reconnecting" ? "(reconnecting…)" : "";
    }

    // The admin's change page shows some of these as read-only fields too: they follow the job as well.
    mirror(name, update) {
      const field = document.querySelector(`.form-row.field-${name} .readonly`);
      if (field) update(field);
    }

    async readTimeline() {
      if (!this.eventsUrl || !this.el.timeline) return;
      if (this.reading) {
        this.readAgain = true;
        return;
      }
      this.reading = true;
      try {
        do {
          this.readAgain = false;
          const events = await getJSON(this.eventsUrl);
          for (const event of events.slice(this.shownEvents)) this.addEvent(event);
          this.shownEvents = Math.max(this.shownEvents, events.length);
        } while (this.readAgain);
      } catch (error) {
        // Left as it is: the next status change reads the timeline again.
      } finally {
        this.reading = false;
      }
    }

    addEvent(event) {
      const row = this.el.timeline.insertRow();
      // As the server renders it: "YYYY-MM-DD HH:MM:SS" in the server's time zone.
      const at = String(event.at).replace("T", " ").slice(0, 19);
      for (const value of [at, event.type, event.status, event.message]) row.insertCell().textContent = value ?? "";
    }
  }

  class ListPoller {
    constructor(root) {
      this.url = root.dataset.statusesUrl;
      this.rows = new Map();
      for (const row of document.querySelectorAll("#result_list tbody tr")) {
        const box = row.querySelector("input.action-select");
        if (box) this.rows.set(box.value, row);
      }
    }

    start() {
      if (this.rows.size) setTimeout(() => this.poll(), POLL_MS);
    }

    async poll() {
      let next = POLL_MS;
      if (!document.hidden) {
        try {
          const answer = await getJSON(`${this.url}?ids=${[...this.rows.keys()].join(",")}`);
          for (const job of answer.jobs) this.show(job);
        } catch (error) {
          next = POLL_MS * 5; // logged out, or the server away: ask less often
        }
      }
      setTimeout(() => this.poll(), next);
    }

    show(job) {
      const row = this.rows.get(job.id);
      if (!row) return;
      const shown = `${job.status} ${job.progress} ${job.progress_message}`;
      if (row.dataset.shown === shown) return;
      row.dataset.shown = shown;
      row.dataset.status = job.status;
      const status = row.querySelector("td.field-status");
      if (status) status.textContent = job.status_display;
      const progress = row.querySelector("td.field-progress_bar");
      if (progress) renderProgress(progress, job.progress, job.progress_message);
    }
  }

  function start() {
    for (const root of document.querySelectorAll("[data-job-live]")) new JobView(root).connect();
    for (const root of document.querySelectorAll("[data-job-list-live]")) new ListPoller(root).start();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
