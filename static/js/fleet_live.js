// "Your Islands", live: the list renders itself again when an Island changes.
//
// The server renders the list; this file only decides when to ask for it
// again (the same request as the Refresh button: htmx, the current query
// string, the #island-list part). It asks when
// - the socket /ws/islands/ says an Island changed: a status transition or
//   an ended job (never a plain heartbeat), or its snapshot on connecting
//   differs from what the page shows (each Island's data-live);
// - the clock alone changes a card (data-next-change: an online Island's
//   deadline, the end of a down Island's grace);
// - every POLL_MS while the socket is down, and every SAFETY_MS while it
//   is up (the channel layer may drop a message; karma moved by the
//   watcher's rules sends none).
// Between renders "12 s ago" counts up in the browser. The page works
// without this file: the Refresh button and a reload do the same.
(function () {
  "use strict";
  var POLL_MS = 5000; // while the socket is down
  var SAFETY_MS = 30000; // while it is up
  var SILENCE_MS = 5000; // an open socket must send its snapshot within this
  var BACKOFF_MS = [1000, 2000, 4000, 8000, 15000, 30000];
  var CLOSE_UNAUTHENTICATED = 4401;

  function list() {
    return document.getElementById("island-list");
  }

  function ago(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    var days = Math.floor(seconds / 86400);
    return days + (days === 1 ? " day ago" : " days ago");
  }

  var live = {
    socket: null,
    connected: false,
    attempt: 0,
    inFlight: false,
    again: false,
    timers: {},
    // The server's clock minus the browser's, from the latest render.
    skew: 0
  };

  function later(name, ms, fn) {
    clearTimeout(live.timers[name]);
    live.timers[name] = setTimeout(fn, Math.max(0, ms));
  }

  function showState() {
    var text = document.querySelector("#island-list [data-live-text]");
    if (text) {
      text.textContent = live.connected ? "· live" : "· checking every " + POLL_MS / 1000 + " s";
    }
    var root = list();
    if (root) root.setAttribute("data-connection", live.connected ? "live" : "polling");
  }

  // Someone typing a search, renaming an Island or setting its maintenance
  // keeps their form: the render waits until they are done.
  function busy(root) {
    var active = document.activeElement;
    if (active && root.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) return true;
    return root.querySelector("details[open]") !== null;
  }

  function refresh() {
    var root = list();
    if (!root || !window.htmx) return;
    if (live.inFlight) {
      live.again = true;
      return;
    }
    if (busy(root)) {
      later("busy", 1000, refresh);
      return;
    }
    live.inFlight = true;
    // If this request fails, the next poll tries again.
    later("poll", live.connected ? SAFETY_MS : POLL_MS, refresh);
    window.htmx
      .ajax("GET", location.pathname + location.search, { target: "#island-list", swap: "outerHTML" })
      .then(
        function () { finished(); },
        function () { finished(); }
      );
  }

  function finished() {
    live.inFlight = false;
    if (live.again) {
      live.again = false;
      refresh();
    }
  }

  // After every render of the list: the clock's next change, the poll, the ticking "ago".
  function rendered() {
    var root = list();
    if (!root) return;
    var serverNow = Date.parse(root.getAttribute("data-now"));
    if (!isNaN(serverNow)) live.skew = serverNow - Date.now();
    var next = Date.parse(root.getAttribute("data-next-change") || "");
    if (!isNaN(next)) {
      later("clock", next - (Date.now() + live.skew) + 500, refresh);
    } else {
      clearTimeout(live.timers.clock);
    }
    later("poll", live.connected ? SAFETY_MS : POLL_MS, refresh);
    tick();
    showState();
  }

  function tick() {
    var now = Date.now() + live.skew;
    document.querySelectorAll("#island-list time.ago").forEach(function (el) {
      var when = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(when)) el.textContent = ago((now - when) / 1000);
    });
  }

  function differs(snapshot) {
    var root = list();
    if (!root) return false;
    var ids = Object.keys(snapshot);
    if (String(ids.length) !== root.getAttribute("data-total")) return true;
    var shown = root.querySelectorAll("[data-island][data-live]");
    for (var i = 0; i < shown.length; i++) {
      if (snapshot[shown[i].getAttribute("data-island")] !== shown[i].getAttribute("data-live")) return true;
    }
    return false;
  }

  function connect() {
    var root = list();
    if (!root) return;
    var url =
      (location.protocol === "https:" ? "wss://" : "ws://") + location.host + root.getAttribute("data-socket-path");
    var heard = false;
    var socket;
    try {
      socket = new WebSocket(url);
    } catch (error) {
      dropped();
      return;
    }
    live.socket = socket;
    socket.onopen = function () {
      later("silence", SILENCE_MS, function () {
        if (!heard && live.socket === socket) socket.close(1000);
      });
    };
    socket.onmessage = function (event) {
      if (live.socket !== socket) return;
      var message = JSON.parse(event.data);
      if (message.type === "snapshot") {
        heard = true;
        live.connected = true;
        live.attempt = 0;
        later("poll", SAFETY_MS, refresh);
        showState();
        if (differs(message.islands)) refresh();
      } else if (message.type === "changed") {
        refresh();
      }
    };
    socket.onclose = function (event) {
      if (live.socket !== socket) return;
      live.socket = null;
      live.connected = false;
      if (event.code === CLOSE_UNAUTHENTICATED) {
        // Signed out elsewhere: the list's request gets HX-Redirect to the login page.
        refresh();
        return;
      }
      dropped();
    };
  }

  // The socket could not connect or went away: render now (something may
  // have changed in the gap), poll, and try the socket again later.
  function dropped() {
    showState();
    refresh();
    var delay = BACKOFF_MS[Math.min(live.attempt, BACKOFF_MS.length - 1)];
    live.attempt += 1;
    later("reconnect", delay, connect);
  }

  function start() {
    var root = list();
    if (!root || !root.hasAttribute("data-live-list")) return;
    // Whichever swap rendered the list (ours, the Refresh button's), start from it.
    document.body.addEventListener("htmx:afterSettle", rendered);
    rendered();
    connect();
    setInterval(tick, 1000);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
