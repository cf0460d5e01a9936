"""Host software: everything that talks to chips through a reader. One sub-package per system
(``pay``, ``load``, ``settle``), the kit every server shares (``kit``), the card side every
client shares (``terminal``), and the roots that put them together (``cli``, ``demo``)."""
