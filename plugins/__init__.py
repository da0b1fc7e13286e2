"""Analysis stages, each registered in the entry-point group ``scopestream.stages``.

Built-ins: ``frame_stats``. Import a stage's module for its settings model and batch API.
"""
