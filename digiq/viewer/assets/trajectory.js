/* digiq view — trajectory page: marker layers (checkboxes) and candidate highlighting on hover.
   The page is complete without this script; it only toggles CSS classes. */
(function () {
  "use strict";
  var body = document.body;
  var STORE = "digiq-view-layers";

  function applyLayer(box) {
    var layer = box.dataset.layer;
    if (layer === "act") body.classList.toggle("hide-act", !box.checked);
    else body.classList.toggle("show-" + layer, box.checked);
  }

  var saved = {};
  try { saved = JSON.parse(sessionStorage.getItem(STORE) || "{}"); } catch (e) { saved = {}; }
  document.querySelectorAll("input[data-layer]").forEach(function (box) {
    if (box.dataset.layer in saved) box.checked = saved[box.dataset.layer];
    applyLayer(box);
    box.addEventListener("change", function () {
      applyLayer(box);
      saved[box.dataset.layer] = box.checked;
      try { sessionStorage.setItem(STORE, JSON.stringify(saved)); } catch (e) { /* file:// without storage */ }
    });
  });

  // hovering a candidate row shows (and thickens) its marker on the step's screenshot
  document.querySelectorAll("section.step").forEach(function (section) {
    section.querySelectorAll("tr[data-mark]").forEach(function (row) {
      var marks = section.querySelectorAll('.mark[data-mark="' + row.dataset.mark + '"]');
      row.addEventListener("mouseenter", function () { marks.forEach(function (m) { m.classList.add("hl"); }); });
      row.addEventListener("mouseleave", function () { marks.forEach(function (m) { m.classList.remove("hl"); }); });
    });
  });
})();
