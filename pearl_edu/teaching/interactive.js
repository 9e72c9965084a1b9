(function () {
  var root = document.getElementById("ELEMENT_ID");
  if (!root || root.dataset.ready) { return; }
  root.dataset.ready = "loading";
  var spec = JSON.parse(root.querySelector("script.pearl-spec").textContent);
  function loadPlotly() {
    if (window.Plotly) { return Promise.resolve(window.Plotly); }
    if (!window.pearlPlotly) {
      window.pearlPlotly = new Promise(function (resolve, reject) {
        var base = document.documentElement.getAttribute("data-content_root");
        var script = document.createElement("script");
        script.src = (base === null ? "../" : base) + "PLOTLY_PATH";
        script.onload = function () {
          window.Plotly ? resolve(window.Plotly) : reject(new Error("no Plotly"));
        };
        script.onerror = reject;
        document.head.appendChild(script);
      });
    }
    return window.pearlPlotly;
  }
  var inputs = root.querySelectorAll("input[data-slider]");
  function positions() {
    return Array.prototype.map.call(inputs, function (input) { return +input.value; });
  }
  function frameIndex(sliders, at) {
    return sliders.reduce(function (i, s) {
      return i * spec.sliders[s].values.length + at[s];
    }, 0);
  }
  function combine(offset, basis, values) {
    return offset.map(function (c, j) {
      return basis.reduce(function (sum, b, k) { return sum + values[k] * b[j]; }, c);
    });
  }
  function draw(Plotly, plot) {
    var at = positions();
    var values = at.map(function (p, k) { return spec.sliders[k].values[p]; });
    var data = spec.traces.map(function (trace) { return Object.assign({}, trace); });
    spec.updates.forEach(function (u) {
      if (u.frames) {
        var frame = u.frames[frameIndex(u.sliders, at)];
        if (frame.x) { data[u.trace].x = frame.x; }
        data[u.trace].y = frame.y;
      } else { data[u.trace].y = combine(u.offset, u.basis, values); }
    });
    inputs.forEach(function (input, k) {
      var s = spec.sliders[k];
      input.nextElementSibling.textContent = s.names.length ? s.names[at[k]]
        : values[k].toFixed(s.digits) + s.unit;
    });
    var r = spec.readout;
    if (r) {
      var text = r.texts.length ? r.texts[frameIndex(r.sliders, at)]
        : r.template.replace(/\{(\d+)\}/g, function (_, j) {
            return values.reduce(function (sum, v, k) {
              return sum + v * r.bases[+j][k];
            }, r.offsets[+j]).toFixed(r.digits);
          });
      root.querySelector(".pearl-readout").textContent = text;
    }
    var layout = JSON.parse(JSON.stringify(spec.layout));  // Plotly writes into its layout
    return Plotly.react(plot, data, layout, {displayModeBar: false, responsive: true});
  }
  loadPlotly().then(function (Plotly) {
    var plot = root.querySelector(".pearl-plot");
    root.querySelector(".pearl-live").hidden = false;
    return draw(Plotly, plot).then(function () {
      root.querySelector(".pearl-static").style.display = "none";
      inputs.forEach(function (input) {
        input.addEventListener("input", function () { draw(Plotly, plot); });
      });
      root.dataset.ready = "yes";
    });
  }).catch(function () {
    root.querySelector(".pearl-live").hidden = true;
    root.dataset.ready = "static";
  });
})();
