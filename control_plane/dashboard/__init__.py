"""The admin dashboard: a page of plots over the worker history, read through the
read-only SQL path (:mod:`.queries`), shaped into series (:mod:`.series`), over a bounded
time range (:mod:`.ranges`); its browser session (:mod:`.session`) and its files, which
ship with the package, plotly.js from the ``plotly`` package (:mod:`.assets`)."""
