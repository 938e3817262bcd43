// Pairing code inputs: upper-case as the user types and keep only letters
// and digits, at most six. The server normalises again, so this is comfort,
// not validation. Delegated, so inputs swapped in by htmx work too.
(function () {
  "use strict";
  var LENGTH = 6;

  function clean(value) {
    return value.toUpperCase().replace(/[^A-Z0-9]/g, "").slice(0, LENGTH);
  }

  document.addEventListener("input", function (event) {
    var input = event.target;
    if (!(input instanceof HTMLInputElement) || !input.hasAttribute("data-code-input")) {
      return;
    }
    var cleaned = clean(input.value);
    if (cleaned !== input.value) {
      input.value = cleaned;
      input.setSelectionRange(cleaned.length, cleaned.length);
    }
  });
})();
