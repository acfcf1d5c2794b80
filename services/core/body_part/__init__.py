"""Image-based body-part detectors: the ``BodyPartDetector`` protocol (``base``), the
lung-air heuristic (``lung_air``), the body-part regression network's detector (``bpr_*``),
and the registry that builds one by name (``detectors``).

The package imports nothing itself: a module that needs only a type of one detector (the
inference backends need ``bpr_detector``'s) does not load the others' libraries.
"""
