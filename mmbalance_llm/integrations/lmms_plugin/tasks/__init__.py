"""The legacy plugin layout of lmms-eval also needs a ``tasks`` package; this plugin adds no tasks."""
