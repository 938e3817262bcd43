// "Your Islands" and the Island page: small touches over server-rendered HTML.
//
// - Copy buttons (hidden without JavaScript) copy an Island ID.
// - <time class="local-time"> is shown in the browser's time zone (the server
//   renders UTC and says so).
// - A form with data-confirm asks before it is sent (no onsubmit= attribute:
//   the Content-Security-Policy runs no inline script).
// The page works without this file; it only makes it nicer.
(function () {
  "use strict";

  function pad(n) {
    return (n < 10 ? "0" : "") + n;
  }

  function localize(root) {
    root.querySelectorAll("time.local-time").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when.getTime())) return;
      var text = pad(when.getHours()) + ":" + pad(when.getMinutes());
      if (el.hasAttribute("data-seconds")) text += ":" + pad(when.getSeconds());
      el.textContent = text;
      el.title = when.toString();
    });
  }

  function enableCopy(root) {
    root.querySelectorAll("button.copy[data-copy]").forEach(function (button) {
      button.hidden = false;
    });
  }

  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute && event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("button.copy[data-copy]");
    if (!button) return;
    var text = button.getAttribute("data-copy");
    var done = function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 2000);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { button.textContent = "Select and copy"; });
    } else {
      // Plain http on a LAN: select the ID so Ctrl+C copies it.
      var code = button.parentNode.querySelector("code");
      var range = document.createRange();
      range.selectNodeContents(code);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    }
  });

  function enhance(root) {
    localize(root);
    enableCopy(root);
  }

  document.addEventListener("DOMContentLoaded", function () { enhance(document); });
  document.addEventListener("htmx:afterSettle", function (event) { enhance(event.target); });
  window.archipelagEnhance = enhance;
})();
