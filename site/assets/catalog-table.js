/* Sort and filter the catalog table (table.atlas-table) in the browser, and sort every
   table.atlas-sortable (the arena's results).
   Click a column heading to sort (again to reverse); cells marked data-missing (a work without a
   citation count, a run without a value) always sort last. The filter box matches every cell plus the row's slug, arXiv
   id, DOI and every author; the branch menu keeps works under one taxonomy branch. */
(function () {
  "use strict";

  function cellValue(row, index, type) {
    var cell = row.cells[index];
    if (cell.dataset.missing !== undefined) return null;  // no value: sorts last either way
    var raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent;
    if (type === "number") {
      var n = parseFloat(raw);
      return isNaN(n) ? -Infinity : n;
    }
    return raw.trim().toLowerCase();
  }

  function sortBy(table, th) {
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var index = headers.indexOf(th);
    var type = th.dataset.type || "text";
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (row, i) { return [cellValue(row, index, type), i, row]; });
    keyed.sort(function (a, b) {
      if (a[0] === null || b[0] === null) {
        if (a[0] === b[0]) return a[1] - b[1];
        return a[0] === null ? 1 : -1;
      }
      if (a[0] < b[0]) return ascending ? -1 : 1;
      if (a[0] > b[0]) return ascending ? 1 : -1;
      return a[1] - b[1];
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (k) { frag.appendChild(k[2]); });
    body.appendChild(frag);
    headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }

  function applyFilter(table, input, branch, counter) {
    var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
    var wanted = branch.value;
    var shown = 0;
    var rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var row = rows[i];
      var text = (row.textContent + " " + (row.dataset.extra || "")).toLowerCase();
      var ok = words.every(function (w) { return text.indexOf(w) !== -1; });
      if (ok && wanted) ok = (" " + row.dataset.branches + " ").indexOf(" " + wanted + " ") !== -1;
      row.hidden = !ok;
      if (ok) shown++;
    }
    counter.textContent = shown + " of " + rows.length + " works";
  }

  function sortable(table) {
    if (table.dataset.atlasReady) return;
    table.dataset.atlasReady = "1";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, th); }
      });
    });
  }

  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("table.atlas-sortable"), sortable);
    var table = document.getElementById("atlas-catalog");
    if (!table || table.dataset.atlasReady) return;
    var input = document.getElementById("atlas-filter");
    var branch = document.getElementById("atlas-branch");
    var counter = document.getElementById("atlas-count");
    sortable(table);
    var update = function () { applyFilter(table, input, branch, counter); };
    input.addEventListener("input", update);
    branch.addEventListener("change", update);
    update();
  }

  if (typeof document$ !== "undefined") {
    document$.subscribe(init);
  } else {
    document.addEventListener("DOMContentLoaded", init);
  }
})();
