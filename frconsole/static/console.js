// Light progressive enhancement: a page whose heading has data-refresh="N" reloads every
// N seconds, unless the person is typing in a form. Without JavaScript, nothing is lost.
(function () {
  "use strict";
  var marked = document.querySelector("[data-refresh]");
  if (!marked) { return; }
  var seconds = parseInt(marked.getAttribute("data-refresh"), 10);
  if (!(seconds > 0)) { return; }
  setInterval(function () {
    var active = document.activeElement;
    if (active && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) { return; }
    window.location.reload();
  }, seconds * 1000);
})();
