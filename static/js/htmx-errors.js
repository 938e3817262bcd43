// Error answers to htmx requests, the same with DEBUG on and off.
//
// Form errors come back as a fragment (422, or 409/429/503 for a code
// linked elsewhere, rate limits and outages) holding the form with its
// messages; the htmx-config meta tag swaps them into their target like any
// answer. Any other error answer is a whole page (a CSRF 403, a 404, a 500):
// it is not a piece of this page, so it gets one message at the top of the
// page instead of a swap.
//
// This script is loaded before django-htmx's DEBUG script, whose listener
// would replace the whole document with the answer, fragments included; the
// listener here runs first and stops it.
(function () {
  "use strict";

  var MESSAGES = {
    403: "The server refused that request (403). The page may be out of date: reload it and try again.",
    404: "That no longer exists (404). Reload the page to see what is there now.",
    500: "Something went wrong on our side (500). Try again in a moment.",
  };

  function isWholePage(text) {
    return /^\s*(<!doctype|<html)/i.test(text || "");
  }

  function showPageMessage(text) {
    var message = document.getElementById("htmx-error");
    if (!message) {
      message = document.createElement("p");
      message.id = "htmx-error";
      message.className = "message error";
      message.setAttribute("role", "alert");
      var main = document.querySelector("main") || document.body;
      main.insertBefore(message, main.firstChild);
    }
    message.textContent = text;
  }

  document.addEventListener("htmx:beforeOnLoad", function (event) {
    var xhr = event.detail.xhr;
    if (xhr.status < 400) {
      var stale = document.getElementById("htmx-error");
      if (stale) stale.remove();
      return;
    }
    event.stopImmediatePropagation();
    if (!isWholePage(xhr.responseText)) {
      return; // a form with its errors: htmx swaps it into the form's target
    }
    event.preventDefault(); // no swap
    showPageMessage(
      MESSAGES[xhr.status] || "That request failed (" + xhr.status + "). Reload the page and try again."
    );
  });

  document.addEventListener("htmx:sendError", function () {
    showPageMessage("Could not reach Archipelag.io. Check your connection and try again.");
  });
})();
