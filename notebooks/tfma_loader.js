// A classic-Notebook extension that `make notebooks` enables beside TFMA's own
// (notebooks/server.py). TFMA's widget front end adds its templates, vulcanized_tfma.js, as a plain
// <script> the first time a widget draws. That file holds UMD modules (d3-tip among them) which
// call an anonymous define() when they see RequireJS's define.amd; RequireJS then fails the next
// require() of the page ("Mismatched anonymous define() module"), which is the creation of the
// next widget's model: every TFMA widget after the first shows "Error displaying widget".
// This loads the same file, under the same URL, at page load, with define.amd hidden while it
// runs, so that those modules take their global branch; TFMA's loader finds the <script> and adds
// no second one.
define([], function () {
  "use strict";

  function load_ipython_extension() {
    var base = document.body.getAttribute("data-base-url") || "/";
    var src = base + "nbextensions/tensorflow_model_analysis/vulcanized_tfma.js";
    if (document.querySelector('script[src="' + src + '"]')) {
      return;
    }
    var amd = window.define && window.define.amd;
    if (amd) {
      window.define.amd = undefined;
    }
    var script = document.createElement("script");
    script.setAttribute("src", src);
    script.onload = script.onerror = function () {
      if (amd) {
        window.define.amd = amd;
      }
    };
    document.head.appendChild(script);
  }

  return {load_ipython_extension: load_ipython_extension};
});
