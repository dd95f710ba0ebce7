"""The convergence loop (I/O): triggers -> debounce -> one level-triggered reconcile pass -> status."""
