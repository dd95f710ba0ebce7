"""hypeman-ingress: a GitOps-style ingress reconciler in front of Caddy.

Layers, top to bottom (a layer imports only layers below it; ``tests/test_layers.py`` enforces it)::

    cli                      thin: parse flags, configure logging, call into the app
    loop                     triggers -> debounce -> reconcile once -> status
    caddy  sources  state    I/O edges: admin client + supervisor | loader + watcher
    render  diff  validate   PURE: model -> Caddy JSON; normalise + structural diff; semantic checks
    model  schema  errors    PURE: dataclasses, JSON Schema, error tree
    settings                 PURE: configuration values
"""

__version__ = "0.1.0"
