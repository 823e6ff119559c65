"""Serving: the Ray Serve search application over a run's gallery index (``app``), the
Ray-free search it runs (``search``) and its page (``page.html``)."""
