"""The stages, in the order the data go through them, each owning its group of the store:

``ingest`` (file -> ``raw``, with ``readers``), ``prep`` (-> ``prep``), ``train`` (-> ``model``),
``map`` (-> ``affine``, ``strain``); ``run`` chains them; ``store`` holds the rules they share.
"""
