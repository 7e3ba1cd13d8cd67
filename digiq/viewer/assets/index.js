/* digiq view — index page: filter, sort and paginate window.DIGIQ_INDEX (column arrays).
   Only one page of rows is in the DOM at a time, so 10,000+ trajectories open instantly.
   State (filters, sort, page) lives in location.hash and sessionStorage, so "back" restores it. */
(function () {
  "use strict";
  var D = window.DIGIQ_INDEX;
  var N = D.id.length;
  var PAGE = D.page_size || 50;
  var STORE = "digiq-view-index";
  var $ = function (id) { return document.getElementById(id); };
  var state = { task: "", succ: "", sort: "id", q: "", page: 0 };
  var order = [];

  var COLUMNS = [
    { head: "#", cell: function (i, k) { return String(k + 1); }, num: true },
    { head: "trajectory", link: true },
    { head: "task", cell: function (i) { return D.tasks[D.task[i]]; } },
    { head: "steps", cell: function (i) { return String(D.len[i]); }, num: true },
    { head: "success", cell: function (i) { return D.succ[i] ? "✓" : "✗"; }, cls: function (i) { return D.succ[i] ? "ok" : "bad"; } },
    { head: "Σ reward", cell: function (i) { return fmt(D.rsum[i]); }, num: true },
    { head: "return G₀", cell: function (i) { return fmt(D.ret[i]); }, num: true }
  ];
  if (D.has_critic) {
    COLUMNS.push({ head: "V(s₀)", cell: function (i) { return fmt(D.v0[i]); }, num: true });
    COLUMNS.push({ head: "mean |TD error|", cell: function (i) { return fmt(D.tderr[i]); }, num: true });
  }

  var SORTS = {
    "id": null,
    "ret-desc": by(D.ret, -1), "ret-asc": by(D.ret, 1),
    "len-desc": by(D.len, -1), "len-asc": by(D.len, 1),
    "tderr-desc": by(D.tderr, -1), "tderr-asc": by(D.tderr, 1),
    "v0-desc": by(D.v0, -1)
  };

  function fmt(x) {
    if (x === null || x === undefined) return "—";
    var s = x.toFixed(3);
    return s === "-0.000" ? "0.000" : s;
  }

  function by(column, sign) {
    if (!column) return null;
    return function (a, b) {  // missing values last; ties keep dataset order
      var x = column[a], y = column[b];
      if (x === null && y === null) return a - b;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x - y) * sign || a - b;
    };
  }

  function href(i) { return "t/" + (D.file ? D.file[i] : D.id[i] + ".html"); }

  function recompute() {
    var task = state.task === "" ? -1 : D.tasks.indexOf(state.task);
    var succ = state.succ === "" ? -1 : Number(state.succ);
    var q = state.q.toLowerCase();
    order = [];
    for (var i = 0; i < N; i++) {
      if (task >= 0 && D.task[i] !== task) continue;
      if (succ >= 0 && D.succ[i] !== succ) continue;
      if (q && D.id[i].toLowerCase().indexOf(q) < 0) continue;
      order.push(i);
    }
    var cmp = SORTS[state.sort];
    if (cmp) order.sort(cmp);
  }

  function pages() { return Math.max(1, Math.ceil(order.length / PAGE)); }

  function render() {
    var t0 = performance.now();
    state.page = Math.min(Math.max(0, state.page), pages() - 1);
    var start = state.page * PAGE, end = Math.min(order.length, start + PAGE);
    var body = document.createDocumentFragment();
    for (var k = start; k < end; k++) {
      var i = order[k], tr = document.createElement("tr");
      tr.dataset.traj = D.id[i];
      for (var c = 0; c < COLUMNS.length; c++) {
        var col = COLUMNS[c], td = document.createElement("td");
        if (col.link) {
          var a = document.createElement("a");
          a.href = href(i);
          a.textContent = D.id[i];
          td.appendChild(a);
        } else {
          td.textContent = col.cell(i, k);
        }
        if (col.num) td.className = "num";
        if (col.cls) td.className = col.cls(i);
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
    var rows = $("rows");
    rows.textContent = "";
    rows.appendChild(body);
    $("count").textContent = (order.length ? (start + 1) + "–" + end : "0") + " of " + order.length +
      (order.length !== N ? " (filtered from " + N + ")" : "") + " trajectories";
    $("page").textContent = "page " + (state.page + 1) + " of " + pages();
    $("first").disabled = $("prev").disabled = state.page === 0;
    $("next").disabled = $("last").disabled = state.page >= pages() - 1;
    save();
    window.digiqLastRenderMs = performance.now() - t0;
  }

  function save() {
    var hash = "#" + new URLSearchParams(state).toString();
    if (location.hash !== hash) history.replaceState(null, "", hash);
    try { sessionStorage.setItem(STORE, hash); } catch (e) { /* storage may be off for file:// */ }
  }

  function restore() {
    var hash = location.hash;
    if (!hash) { try { hash = sessionStorage.getItem(STORE) || ""; } catch (e) { hash = ""; } }
    var params = new URLSearchParams(hash.replace(/^#/, ""));
    Object.keys(state).forEach(function (key) {
      if (params.has(key)) state[key] = key === "page" ? Number(params.get(key)) || 0 : params.get(key);
    });
    if (!(state.sort in SORTS) || (SORTS[state.sort] === null && state.sort !== "id")) state.sort = "id";
    if (state.task && D.tasks.indexOf(state.task) < 0) state.task = "";
  }

  function setup() {
    var head = $("head");
    COLUMNS.forEach(function (col) {
      var th = document.createElement("th");
      th.textContent = col.head;
      head.appendChild(th);
    });
    var taskSelect = $("f-task");
    D.tasks.forEach(function (task) {
      var option = document.createElement("option");
      option.value = option.textContent = task;
      taskSelect.appendChild(option);
    });
    restore();
    $("f-task").value = state.task;
    $("f-succ").value = state.succ;
    $("f-sort").value = state.sort;
    $("f-id").value = state.q;
    [["f-task", "task"], ["f-succ", "succ"], ["f-sort", "sort"], ["f-id", "q"]].forEach(function (pair) {
      $(pair[0]).addEventListener(pair[0] === "f-id" ? "input" : "change", function (event) {
        state[pair[1]] = event.target.value;
        state.page = 0;
        recompute();
        render();
      });
    });
    $("first").onclick = function () { state.page = 0; render(); };
    $("prev").onclick = function () { state.page -= 1; render(); };
    $("next").onclick = function () { state.page += 1; render(); };
    $("last").onclick = function () { state.page = pages() - 1; render(); };
    recompute();
    render();
    performance.mark("digiq-index-rendered");
  }

  setup();
})();
