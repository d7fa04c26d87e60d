"""The web console: one page per view of a running pipeline and its registry (``streamfit console``).

:mod:`console.feeds` tails the topics, :mod:`console.live` samples the pipeline's figures,
:mod:`console.catalog` reads the registry, :mod:`console.app` serves them with the static pages.
"""
