"""hypeman-ingress: a GitOps-style ingress reconciler in front of Caddy.

The charter of the layers -- the one description of them; ``tests/test_layers.py`` reads this table and
enforces it. A module imports only modules of lower layers (or of its own package); a name marked ``*``
is PURE: no logging, networking, processes or clock reading::

    9  cli                                          parse the flags, call the command
    8  commands                                     what each command does (run, validate, render, ...)
    7  app                                          the composition root: builds, runs and stops the daemon
    6  api                                          the HTTP API (a thin writer onto {data}/ingresses), the dashboard
    5  loop                                         the outer loop, the pass's stages, Caddy's keeper
    4  sources caddy responder state                I/O edges: readers, watcher | Caddy | DNS responder | state
    3  validate* render* diff* status* statustable* traffic*  rules, Caddy JSON, diff, statuses, status table, traffic
    3  fleet*                                       the node-neutral config hash a fleet compares
    3  cutover*                                     health-gated cutover: which targets a changed rule serves
    2  model* schema* layout* zone* accesslog* procutil  dataclasses, schema, layout, DNS names, access logs | processes
    1  settings* parse* memo* jsonutil* fsutil      values, YAML/JSON parsing, memo, JSON | file writes
    0  errors*                                      the error tree
"""

__version__ = "0.1.0"
