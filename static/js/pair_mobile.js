// /pair/mobile: follow one pairing session until the phone pairs or the code
// expires, without reloading the page.
//
// A websocket carries the session's state: a snapshot from the database first,
// then every change. When it cannot connect, drops, or opens but says nothing,
// the page polls the status URL and keeps reconnecting with backoff. While the
// socket is up a slow poll still runs, because the channel layer may drop a
// message: the page must never stay on "waiting" after the phone has paired.
(function () {
  "use strict";
  var POLL_MS = 2000; // while the socket is down
  var SAFETY_POLL_MS = 15000; // while it is up
  var SILENCE_MS = 5000; // an open socket must send its snapshot within this
  var BACKOFF_MS = [1000, 2000, 4000, 8000, 15000, 30000];
  var CLOSE_UNAUTHENTICATED = 4401;
  var CLOSE_FORBIDDEN = 4403;

  function Watcher(root) {
    this.root = root;
    this.id = root.getAttribute("data-mobile-session");
    this.statusUrl = root.getAttribute("data-status-url");
    this.socketUrl =
      (location.protocol === "https:" ? "wss://" : "ws://") + location.host + root.getAttribute("data-socket-path");
    this.deadline = Date.now() + 1000 * Number(root.getAttribute("data-expires-in"));
    this.socket = null;
    this.live = false;
    this.attempt = 0;
    this.expiring = false;
    this.done = false;
    this.timers = {};
  }

  Watcher.prototype.part = function (name) {
    return this.root.querySelector('[data-part="' + name + '"]');
  };

  Watcher.prototype.field = function (name) {
    return this.root.querySelector('[data-field="' + name + '"]');
  };

  Watcher.prototype.later = function (name, ms, fn) {
    clearTimeout(this.timers[name]);
    this.timers[name] = setTimeout(fn.bind(this), ms);
  };

  Watcher.prototype.setConnection = function (state) {
    this.root.setAttribute("data-connection", state);
    var text = this.root.querySelector("[data-connection-text]");
    if (text) {
      text.textContent = {
        connecting: "",
        live: "This page updates by itself when your phone pairs.",
        polling: "Live updates are unavailable; checking every few seconds.",
        closed: ""
      }[state];
    }
  };

  Watcher.prototype.start = function () {
    this.connect();
    this.tick();
  };

  Watcher.prototype.stop = function () {
    this.done = true;
    for (var name in this.timers) {
      clearTimeout(this.timers[name]);
    }
    if (this.socket) {
      var socket = this.socket;
      this.socket = null;
      socket.close(1000);
    }
    this.setConnection("closed");
  };

  Watcher.prototype.connect = function () {
    var self = this;
    var heard = false;
    var socket;
    try {
      socket = new WebSocket(this.socketUrl);
    } catch (error) {
      this.dropped();
      return;
    }
    this.socket = socket;
    socket.onopen = function () {
      self.later("silence", SILENCE_MS, function () {
        if (!heard && self.socket === socket) {
          socket.close(1000);
        }
      });
    };
    socket.onmessage = function (event) {
      if (self.socket !== socket) {
        return;
      }
      heard = true;
      self.live = true;
      self.attempt = 0;
      self.setConnection("live");
      self.later("poll", SAFETY_POLL_MS, self.poll);
      self.apply(JSON.parse(event.data));
    };
    socket.onclose = function (event) {
      if (self.socket !== socket) {
        return;
      }
      self.socket = null;
      self.live = false;
      if (self.done) {
        return;
      }
      if (event.code === CLOSE_UNAUTHENTICATED || event.code === CLOSE_FORBIDDEN) {
        self.problem(event.code);
        return;
      }
      self.dropped();
    };
  };

  // The socket could not connect or went away: poll now (the phone may have
  // paired in the gap) and every POLL_MS, and try the socket again later.
  Watcher.prototype.dropped = function () {
    this.setConnection("polling");
    this.poll();
    var delay = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
    this.attempt += 1;
    this.later("reconnect", delay, this.connect);
  };

  Watcher.prototype.poll = function () {
    var self = this;
    if (this.done) {
      return;
    }
    this.later("poll", this.live ? SAFETY_POLL_MS : POLL_MS, this.poll);
    fetch(this.statusUrl, { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 401) {
          self.problem(CLOSE_UNAUTHENTICATED);
          return null;
        }
        if (response.status === 404) {
          self.problem(CLOSE_FORBIDDEN);
          return null;
        }
        return response.ok ? response.json() : null;
      })
      .then(function (snapshot) {
        if (snapshot) {
          self.apply(snapshot);
        }
      })
      .catch(function () {
        // Offline for a moment; the next poll tries again.
      });
  };

  Watcher.prototype.apply = function (snapshot) {
    if (this.done || snapshot.session_id !== this.id) {
      return;
    }
    if (snapshot.state === "waiting") {
      this.deadline = Date.now() + 1000 * snapshot.expires_in_seconds;
    } else if (snapshot.state === "paired") {
      this.showPaired(snapshot.island);
    } else if (snapshot.state === "expired") {
      this.showExpired(snapshot.reason);
    }
  };

  Watcher.prototype.tick = function () {
    if (this.done) {
      return;
    }
    var left = Math.max(0, Math.round((this.deadline - Date.now()) / 1000));
    var countdown = this.root.querySelector("[data-countdown]");
    if (countdown) {
      var seconds = left % 60;
      countdown.textContent = Math.floor(left / 60) + ":" + (seconds < 10 ? "0" : "") + seconds;
    }
    if (left === 0 && !this.expiring) {
      // The server's word decides between "expired" and a last-second pairing;
      // if it cannot be reached, the code is expired by now anyway.
      this.expiring = true;
      this.poll();
      this.later("expire", 10000, function () {
        this.showExpired("expired");
      });
    } else if (left > 0 && this.expiring) {
      // The server still counted the code as live (clocks differ a little).
      this.expiring = false;
      clearTimeout(this.timers.expire);
    }
    this.later("tick", 1000, this.tick);
  };

  Watcher.prototype.show = function (name) {
    var names = ["waiting", "paired", "expired", "renew"];
    for (var i = 0; i < names.length; i++) {
      var part = this.part(names[i]);
      if (part) {
        part.hidden = names[i] !== name && !(name === "expired" && names[i] === "renew");
      }
    }
  };

  Watcher.prototype.showPaired = function (island) {
    this.stop();
    this.field("label").textContent = island.label + (island.removed ? " (since removed)" : "");
    var form = this.root.querySelector("[data-remove-form]");
    form.action = island.remove_url;
    form.hidden = island.removed;
    this.show("paired");
    this.root.setAttribute("data-state", "paired");
    this.part("paired").querySelector("h2").focus();
  };

  Watcher.prototype.showExpired = function (reason) {
    this.stop();
    this.field("expired-text").textContent =
      reason === "replaced"
        ? "This code was replaced by a newer one, opened in another window or tab."
        : "This code has expired.";
    this.show("expired");
    this.root.setAttribute("data-state", "expired");
  };

  Watcher.prototype.problem = function (code) {
    this.stop();
    this.field("expired-text").textContent =
      code === CLOSE_UNAUTHENTICATED
        ? "You were signed out. Sign in again, then get a new code."
        : "This pairing code belongs to another account.";
    this.show("expired");
    this.root.setAttribute("data-state", "error");
  };

  var current = null;

  function init(element) {
    var root = element.matches && element.matches("[data-mobile-session]")
      ? element
      : element.querySelector && element.querySelector("[data-mobile-session]");
    if (!root || (current && current.root === root)) {
      return;
    }
    // "Get a new code" swapped in a fresh session: stop following the old one.
    if (current) {
      current.stop();
    }
    current = new Watcher(root);
    current.start();
  }

  init(document);
  if (window.htmx) {
    window.htmx.onLoad(init);
  }
})();
