"""What previews and refines share below them: the device worker, request validation, pixel conversion.

Imports run one way: app (``webui``) -> training -> preview -> refine -> runtime -> models / solver / store.
"""
