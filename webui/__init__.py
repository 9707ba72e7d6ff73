"""The Gradio app: layout and wiring (``app``), input parsing (``inputs``), the records the UI shows
(``views``), handlers (``handlers``, ``admin``) and the adapter to the engine and the store (``backend``)."""
