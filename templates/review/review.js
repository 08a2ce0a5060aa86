// runner review: keyboard handling and saving. No framework: every control is a plain button
// or input inside an .item that names its decision (data-section, data-key, data-extra).
(function () {
  "use strict";
  var status = document.getElementById("status");
  var who = document.getElementById("reviewer");
  try {
    var saved = window.localStorage.getItem("runner-reviewer");
    if (saved && who) { who.value = saved; }
  } catch (e) { /* storage may be off */ }
  if (who) {
    who.addEventListener("change", function () {
      try { window.localStorage.setItem("runner-reviewer", who.value); } catch (e) { /* ignore */ }
    });
  }

  function say(text, bad) {
    status.textContent = text;
    status.className = bad ? "bad" : "";
  }

  function extra(el) {
    try { return JSON.parse(el.getAttribute("data-extra") || "{}"); } catch (e) { return {}; }
  }

  function refresh(item, entry) {
    item.querySelectorAll("button[data-field]").forEach(function (b) {
      var v = JSON.parse(b.getAttribute("data-value"));
      b.setAttribute("aria-pressed", entry[b.getAttribute("data-field")] === v ? "true" : "false");
    });
    var shot = item.querySelector(".shot");
    if (shot && entry.shot) { shot.textContent = entry.shot.replace(/_/g, " "); }
    var w = item.querySelector("[data-who]");
    if (w) { w.textContent = entry.by ? entry.by + " · " + entry.at : ""; }
  }

  // Saves go out one at a time, in the order of the key presses.
  var queue = Promise.resolve();
  function save(item, fields) {
    queue = queue.then(function () { return send(item, fields); });
    return queue;
  }

  function send(item, fields) {
    var body = {
      section: item.getAttribute("data-section"),
      key: item.getAttribute("data-key"),
      fields: fields,
      by: who ? who.value : ""
    };
    say("saving…");
    return fetch("/api/decide", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-Review": "1"},
      credentials: "same-origin",
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error((data.error && data.error.message) || ("HTTP " + r.status)); }
        refresh(item, data.entry);
        item.setAttribute("data-saved", String(Date.now()));
        say("saved " + (item.getAttribute("aria-label") || body.key));
        return data;
      });
    }).catch(function (err) { say("not saved: " + err.message, true); });
  }

  function press(button) {
    var item = button.closest(".item[data-section]");
    var field = button.getAttribute("data-field");
    var on = button.getAttribute("aria-pressed") !== "true";
    var value = JSON.parse(button.getAttribute("data-value"));
    var fields = Object.assign({}, extra(item));
    var also = {};
    try { also = JSON.parse(button.getAttribute("data-also") || "{}"); } catch (e) { also = {}; }
    if (on) {
      Object.assign(fields, also);
      fields[field] = value;
    } else {
      fields[field] = null;
      if (item.hasAttribute("data-withdraw-all")) {
        Object.keys(also).forEach(function (k) { fields[k] = null; });
      } else {
        Object.keys(also).forEach(function (k) { if (also[k] === "set") { fields[k] = null; } });
      }
    }
    return save(item, fields);
  }

  document.addEventListener("click", function (ev) {
    var b = ev.target.closest("button[data-field]");
    if (b) { ev.preventDefault(); press(b); }
  });
  document.addEventListener("change", function (ev) {
    var input = ev.target.closest("input[data-field]");
    if (!input) { return; }
    var item = input.closest(".item[data-section]");
    var fields = Object.assign(extra(item), {});
    fields[input.getAttribute("data-field")] = input.value;
    save(item, fields);
  });

  // Keyboard: j/k move between the items of the page; a key names a button of the current item.
  var items = Array.prototype.slice.call(document.querySelectorAll(".item[tabindex]"));
  var current = -1;
  function focus(i) {
    if (!items.length) { return; }
    i = Math.max(0, Math.min(items.length - 1, i));
    if (current >= 0 && items[current]) { items[current].classList.remove("current"); }
    current = i;
    items[i].classList.add("current");
    items[i].focus({preventScroll: true});
    items[i].scrollIntoView({block: "nearest"});
  }
  items.forEach(function (el, i) {
    el.addEventListener("focus", function () {
      if (current !== i) {
        if (current >= 0 && items[current]) { items[current].classList.remove("current"); }
        current = i;
        el.classList.add("current");
      }
    });
  });
  document.addEventListener("keydown", function (ev) {
    var t = ev.target;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) { return; }
    if (ev.key === "j") { ev.preventDefault(); focus(current + 1); return; }
    if (ev.key === "k") { ev.preventDefault(); focus(current - 1); return; }
    if (current < 0) { return; }
    var b = items[current].querySelector('button[data-shortcut="' + ev.key + '"]');
    if (b) { ev.preventDefault(); press(b); }
  });
  if (items.length) { focus(0); window.scrollTo(0, 0); }
})();
