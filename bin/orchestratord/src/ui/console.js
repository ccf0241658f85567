// The llama-orch operator console. It reads GET /v2/overview every REFRESH_MS with the admin
// token and drains or reloads pools on request. The token is kept in this tab's sessionStorage
// only (gone when the tab closes) and sent to this origin only. Text from the API is always
// set as text, never parsed as markup: pool ids and errors come from the nodes.
'use strict';

(function () {
  const TOKEN_KEY = 'llorch.adminToken';
  const REFRESH_MS = 2000;
  // A read that has not answered in this long counts as unreachable.
  const READ_TIMEOUT_MS = 5000;
  // orchestratord waits up to 300 s for pool-managerd on drain and reload.
  const ACTION_TIMEOUT_MS = 310000;
  const RECENT_TASKS = 30;
  const SVG = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);
  let timer = null;
  // The action the dialog asks about: {kind: 'drain' | 'reload', pool}.
  let asking = null;

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  // ---------------------------------------------------------------- requests

  class Unreachable extends Error {}

  async function call(method, path, body, timeoutMs) {
    const abort = new AbortController();
    const timeout = setTimeout(() => abort.abort(), timeoutMs);
    const init = {
      method,
      headers: { Authorization: 'Bearer ' + token() },
      cache: 'no-store',
      credentials: 'omit',
      referrerPolicy: 'no-referrer',
      signal: abort.signal,
    };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    try {
      return await fetch(path, init);
    } catch (e) {
      const why = abort.signal.aborted ? 'no answer within ' + timeoutMs / 1000 + ' s' : e.message;
      throw new Unreachable(why);
    } finally {
      clearTimeout(timeout);
    }
  }

  // "STATUS CODE: message" of an error answer (the envelope, when it is one).
  async function describe(resp) {
    let text = '';
    try {
      text = await resp.text();
      const env = JSON.parse(text);
      if (env && env.code) {
        return resp.status + ' ' + env.code + ': ' + env.message;
      }
    } catch (e) {
      // Not the envelope: show what came.
    }
    return resp.status + (text ? ': ' + text.slice(0, 200) : '');
  }

  function refused(resp) {
    return resp.status === 401 || resp.status === 403;
  }

  // ---------------------------------------------------------------- banners

  function showError(text) {
    const e = $('error');
    e.textContent = text;
    e.hidden = false;
  }

  function clearError() {
    $('error').hidden = true;
    $('error').textContent = '';
  }

  function showNotice(text, failed) {
    const n = $('notice');
    n.textContent = text;
    n.classList.toggle('failed', Boolean(failed));
    n.hidden = false;
  }

  async function tokenRefused(resp) {
    const why = await describe(resp);
    sessionStorage.removeItem(TOKEN_KEY);
    showError('The admin token was refused (' + why + '). Enter the admin token.');
    showLogin();
  }

  // ---------------------------------------------------------------- login

  function showLogin() {
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
    $('console').hidden = true;
    $('forget-token').hidden = true;
    $('login').hidden = false;
    $('token-input').focus();
  }

  function showConsole() {
    $('login').hidden = true;
    $('console').hidden = false;
    $('forget-token').hidden = false;
  }

  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = $('token-input').value.trim();
    $('token-input').value = '';
    if (!value) {
      showError('Enter the admin token (LLORCH_ADMIN_TOKEN, or LLORCH_API_TOKEN).');
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    showConsole();
    refresh();
  });

  $('forget-token').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    clearError();
    showLogin();
  });

  // ---------------------------------------------------------------- refresh

  function schedule() {
    if (timer === null && token()) {
      timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  async function refresh() {
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
    if (!token()) {
      showLogin();
      return;
    }
    let resp;
    try {
      resp = await call('GET', '/v2/overview?tasks=' + RECENT_TASKS, undefined, READ_TIMEOUT_MS);
    } catch (e) {
      showError('orchestratord is unreachable (' + e.message + '); trying again every ' +
        REFRESH_MS / 1000 + ' s.');
      schedule();
      return;
    }
    if (refused(resp)) {
      await tokenRefused(resp);
      return;
    }
    if (!resp.ok) {
      showError('GET /v2/overview failed: ' + await describe(resp));
      schedule();
      return;
    }
    let data;
    try {
      data = await resp.json();
    } catch (e) {
      showError('GET /v2/overview answered something unreadable: ' + e.message);
      schedule();
      return;
    }
    clearError();
    render(data);
    schedule();
  }

  // ---------------------------------------------------------------- formatting

  function time(ms) {
    return ms ? new Date(ms).toLocaleTimeString() : '–';
  }

  function gib(bytes) {
    return (bytes / (1024 * 1024 * 1024)).toFixed(1) + ' GiB';
  }

  function number(x, digits) {
    return x === null || x === undefined ? '–' : x.toFixed(digits);
  }

  function ago(ms) {
    if (ms === null || ms === undefined) {
      return '–';
    }
    return ms < 1000 ? ms + ' ms ago' : (ms / 1000).toFixed(1) + ' s ago';
  }

  const GOOD = ['ready', 'serving', 'available', 'completed'];
  const BUSY = ['starting', 'draining', 'restarting', 'queued', 'running', 'unknown'];

  function badge(state) {
    const s = document.createElement('span');
    s.className = 'state ' + (GOOD.includes(state) ? 'good' : BUSY.includes(state) ? 'busy' : 'bad');
    s.textContent = state;
    return s;
  }

  function setText(el, text) {
    const t = String(text);
    if (el.textContent !== t) {
      el.textContent = t;
    }
  }

  function cell(tr, text, className) {
    const td = document.createElement('td');
    if (className) {
      td.className = className;
    }
    if (text instanceof Node) {
      td.appendChild(text);
    } else {
      td.textContent = text === null || text === undefined ? '–' : String(text);
    }
    tr.appendChild(td);
    return td;
  }

  // ---------------------------------------------------------------- rendering

  function render(d) {
    setText($('profile'), d.profile.toUpperCase() + ' profile');
    setText($('updated'), 'updated ' + time(d.at_ms));
    setText($('queue-interactive'), d.queue.interactive);
    setText($('queue-batch'), d.queue.batch);
    setText($('queue-capacity'), d.queue.capacity);
    renderRates(d.rates);
    renderPools(d.pools);
    renderNodes(d.profile, d.nodes);
    renderTasks(d.tasks);
  }

  // Pool rows are kept (keyed by pool id) and only their text changes: a button is never
  // replaced between a press and its release.
  function renderPools(pools) {
    const body = $('pools').tBodies[0];
    const rows = new Map();
    for (const tr of Array.from(body.rows)) {
      rows.set(tr.dataset.key, tr);
    }
    pools.forEach((p, i) => {
      let tr = rows.get(p.pool_id);
      rows.delete(p.pool_id);
      if (!tr) {
        tr = poolRow(p.pool_id);
      }
      updatePoolRow(tr, p);
      if (body.rows[i] !== tr) {
        body.insertBefore(tr, body.rows[i] || null);
      }
    });
    for (const tr of rows.values()) {
      tr.remove();
    }
    $('pools-empty').hidden = pools.length > 0;
  }

  function poolRow(id) {
    const tr = document.createElement('tr');
    tr.dataset.key = id;
    cell(tr, id, 'mono pool-id');
    for (const name of ['pool-node', 'pool-model', 'pool-state']) {
      cell(tr, '', name);
    }
    const slots = cell(tr, '', 'num slots');
    slots.appendChild(document.createElement('span'));
    const meter = document.createElement('meter');
    meter.min = 0;
    slots.appendChild(meter);
    for (const name of ['gpu num', 'restarts num', 'error-text']) {
      cell(tr, '', name);
    }
    const actions = cell(tr, '', 'actions');
    for (const [kind, label] of [['drain', 'Drain'], ['reload', 'Reload']]) {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = label;
      b.dataset.action = kind;
      b.dataset.pool = id;
      actions.appendChild(b);
    }
    return tr;
  }

  function updatePoolRow(tr, p) {
    const c = tr.cells;
    setText(c[1], p.node_id || '–');
    setText(c[2], p.model_id);
    const shown = c[3].firstChild;
    if (!shown || shown.textContent !== p.state) {
      c[3].replaceChildren(badge(p.state));
    }
    c[3].title = p.placeable ? 'orchestratord places work here' : 'orchestratord places no work here now';
    tr.dataset.state = p.state;
    setText(c[4].firstChild, p.slots_used + ' / ' + p.slots_total);
    const meter = c[4].lastChild;
    meter.max = Math.max(p.slots_total, 1);
    meter.value = p.slots_used;
    let gpu = '–';
    if (p.vram_free_bytes !== null && p.vram_total_bytes !== null) {
      gpu = gib(p.vram_free_bytes) + ' free of ' + gib(p.vram_total_bytes);
    } else if (p.vram_free_bytes !== null) {
      gpu = gib(p.vram_free_bytes) + ' free';
    }
    setText(c[5], gpu);
    setText(c[6], p.restart_count === null ? '–' : p.restart_count);
    setText(c[7], p.last_error || '');
    c[5].title = p.reported_ms_ago === null ? 'no recent report from the node' :
      'node report ' + ago(p.reported_ms_ago);
  }

  function renderNodes(profile, nodes) {
    const body = $('nodes').tBodies[0];
    const home = profile === 'home' && nodes.length === 0;
    $('nodes').hidden = home;
    $('nodes-home').hidden = !home;
    const rows = nodes.map((n) => {
      const tr = document.createElement('tr');
      cell(tr, n.node_id || '–', 'mono');
      cell(tr, n.address, 'mono');
      cell(tr, badge(n.online ? 'available' : n.availability));
      cell(tr, n.registered ? ago(n.last_heartbeat_ms_ago) : 'polled');
      cell(tr, n.pools.join(', ') || '–', 'mono');
      const gpus = n.gpus.map((g) => g.name + ' ' + gib(g.memory_free_bytes) + ' free of ' +
        gib(g.memory_total_bytes));
      cell(tr, gpus.join('; ') || 'none');
      cell(tr, n.last_error || '', 'error-text');
      return tr;
    });
    body.replaceChildren(...rows);
  }

  function renderTasks(tasks) {
    const body = $('tasks').tBodies[0];
    const rows = tasks.map((t) => {
      const tr = document.createElement('tr');
      tr.dataset.key = t.task_id;
      cell(tr, t.task_id, 'mono task-id');
      cell(tr, badge(t.state));
      cell(tr, t.priority);
      cell(tr, t.pool_id, 'mono');
      cell(tr, t.model);
      cell(tr, t.owner);
      cell(tr, t.api);
      cell(tr, time(t.submitted_at_ms));
      const took = t.finished_at_ms ? ((t.finished_at_ms - t.submitted_at_ms) / 1000).toFixed(2) + ' s' : '';
      cell(tr, took, 'num');
      cell(tr, t.tokens_out, 'num tokens');
      cell(tr, t.error_code || '', 'error-text');
      return tr;
    });
    body.replaceChildren(...rows);
    $('tasks-empty').hidden = tasks.length > 0;
  }

  function renderRates(rates) {
    const buckets = rates.buckets;
    const done = buckets.slice(0, -1);
    const last = done.length ? done[done.length - 1] : buckets[buckets.length - 1];
    setText($('rate-now'), last ? number(last.tokens_per_s, 1) : '–');
    setText($('tokens-total'), buckets.reduce((sum, b) => sum + b.tokens, 0));
    const withLatency = buckets.filter((b) => b.first_token_p50_ms !== null);
    const latest = withLatency[withLatency.length - 1];
    setText($('first-token-now'), latest ? number(latest.first_token_p50_ms, 1) + ' ms' : '–');
    chart($('chart-tps'), buckets.map((b) => b.tokens_per_s), 'bars', $('chart-tps-max'), ' tokens/s');
    chart($('chart-ftl'), buckets.map((b) => b.first_token_p50_ms), 'line', $('chart-ftl-max'), ' ms');
  }

  // 30 slots, newest at the right; the bucket in progress is drawn lighter.
  function chart(svg, values, kind, caption, unit) {
    const slots = 30;
    const width = 300;
    const height = 80;
    const step = width / slots;
    const offset = slots - values.length;
    const max = Math.max(0, ...values.filter((v) => v !== null));
    setText(caption, max > 0 ? '(peak ' + max.toFixed(1) + unit + ')' : '');
    const parts = [];
    const axis = document.createElementNS(SVG, 'line');
    axis.setAttribute('class', 'axis');
    axis.setAttribute('x1', '0');
    axis.setAttribute('x2', String(width));
    axis.setAttribute('y1', String(height - 0.5));
    axis.setAttribute('y2', String(height - 0.5));
    parts.push(axis);
    const y = (v) => height - 2 - (max > 0 ? (v / max) * (height - 6) : 0);
    const points = [];
    values.forEach((v, i) => {
      if (v === null) {
        return;
      }
      const x = (offset + i) * step;
      if (kind === 'bars') {
        const r = document.createElementNS(SVG, 'rect');
        r.setAttribute('class', i === values.length - 1 ? 'bar current' : 'bar');
        r.setAttribute('x', String(x + 1));
        r.setAttribute('width', String(step - 2));
        r.setAttribute('y', String(y(v)));
        r.setAttribute('height', String(height - y(v)));
        parts.push(r);
      } else {
        points.push((x + step / 2) + ',' + y(v));
        const dot = document.createElementNS(SVG, 'circle');
        dot.setAttribute('class', 'dot');
        dot.setAttribute('cx', String(x + step / 2));
        dot.setAttribute('cy', String(y(v)));
        dot.setAttribute('r', '1.8');
        parts.push(dot);
      }
    });
    if (kind === 'line' && points.length > 1) {
      const line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('class', 'line');
      line.setAttribute('points', points.join(' '));
      parts.push(line);
    }
    svg.replaceChildren(...parts);
  }

  // ---------------------------------------------------------------- drain and reload

  $('pools').addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-action]');
    if (b) {
      ask(b.dataset.action, b.dataset.pool);
    }
  });

  function ask(kind, pool) {
    asking = { kind, pool };
    const input = $('action-value');
    if (kind === 'drain') {
      $('action-title').textContent = 'Drain pool ' + pool;
      $('action-label').textContent = 'Deadline (ms)';
      $('action-help').textContent = 'New work stops going to the pool at once; tasks running ' +
        'there may finish within the deadline, then its engine stops.';
      input.inputMode = 'numeric';
      input.value = '30000';
    } else {
      $('action-title').textContent = 'Reload pool ' + pool;
      $('action-label').textContent = 'Model path on the node';
      $('action-help').textContent = 'A GGUF file in one of the node\'s model directories ' +
        '(POOL_MANAGERD_MODEL_DIRS). The new engine starts, then replaces the old one.';
      input.inputMode = 'text';
      input.value = '';
    }
    $('action-dialog').showModal();
    input.focus();
    input.select();
  }

  $('action-cancel').addEventListener('click', () => {
    asking = null;
    $('action-dialog').close();
  });

  $('action-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (!asking) {
      return;
    }
    const { kind, pool } = asking;
    const value = $('action-value').value.trim();
    let body;
    if (kind === 'drain') {
      if (!/^[0-9]+$/.test(value)) {
        $('action-help').textContent = 'The deadline is a whole number of milliseconds.';
        return;
      }
      body = { deadline_ms: Number(value) };
    } else {
      if (!value) {
        $('action-help').textContent = 'Give the path of the model file on the node.';
        return;
      }
      body = { new_model_ref: value };
    }
    asking = null;
    $('action-dialog').close();
    const label = (kind === 'drain' ? 'Drain' : 'Reload') + ' of pool ' + pool;
    showNotice(label + ': sent, waiting for pool-managerd…');
    let resp;
    try {
      resp = await call('POST', '/v2/pools/' + encodeURIComponent(pool) + '/' + kind, body,
        ACTION_TIMEOUT_MS);
    } catch (e) {
      showNotice(label + ' not sent: orchestratord is unreachable (' + e.message + ').', true);
      return;
    }
    if (refused(resp)) {
      await tokenRefused(resp);
      return;
    }
    if (resp.ok) {
      showNotice(label + ' accepted (' + resp.status + ').');
    } else {
      showNotice(label + ' refused: ' + await describe(resp), true);
    }
    refresh();
  });

  // ---------------------------------------------------------------- start

  if (token()) {
    showConsole();
    refresh();
  } else {
    showLogin();
  }
})();
