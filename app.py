"""Diffusion Preview: the web app (``python app.py --help``; installed: ``diffusion-preview``)."""
from webui.app import main

if __name__ == "__main__":
    main()
