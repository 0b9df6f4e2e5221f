/* Give every cell of a content table its column's name (data-label), which the phone layout in
   atlas.css shows in front of the value when a table turns into a list of cards. */
(function () {
  "use strict";

  function label() {
    var tables = document.querySelectorAll(".md-typeset table:not([class]), .md-typeset table.atlas-table");
    Array.prototype.forEach.call(tables, function (table) {
      if (!table.tHead || !table.tHead.rows.length) return;
      var names = Array.prototype.map.call(table.tHead.rows[0].cells, function (th) {
        return th.textContent.replace(/[↕▲▼]/g, "").trim();
      });
      Array.prototype.forEach.call(table.tBodies, function (body) {
        Array.prototype.forEach.call(body.rows, function (row) {
          Array.prototype.forEach.call(row.cells, function (cell, i) {
            if (!cell.dataset.label && names[i]) cell.dataset.label = names[i];
          });
        });
      });
    });
  }

  if (typeof document$ !== "undefined") {
    document$.subscribe(label);
  } else {
    document.addEventListener("DOMContentLoaded", label);
  }
})();
