"""Gradio app: upload a volume, browse its slices, ask the model about it.

    python -m med3dvlm.app model_dir=exports/vlm            # then open http://127.0.0.1:7860
    python -m med3dvlm.app model_dir=exports/siglip texts=@candidates.txt host=0.0.0.0 port=8080

The page is :class:`med3dvlm.webui.VolumeApp`; the keys are those of ``configs/app.yaml``
(``--help`` lists them). The server binds to 127.0.0.1 unless ``host=`` says otherwise, so a volume
is not exposed to the network by default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from med3dvlm.cli import hydra_command, list_value, number
from med3dvlm.webui import VolumeApp, launch

PROGRAM = "med3dvlm.app"


def build_app(settings: Any) -> VolumeApp:
    """The page for ``settings`` (the keys of ``configs/app.yaml``), with its model loaded."""
    from med3dvlm.api import load_model

    model_dir = str(settings["model_dir"])
    model = load_model(model_dir, device=settings["device"], dtype=settings["dtype"])
    return VolumeApp(
        model,
        max_upload_mb=number(settings, "max_upload_mb", float),
        max_new_tokens=number(settings, "max_new_tokens", int),
        texts=list_value(settings["texts"], "texts"),
        title=f"med3dvlm: {Path(model_dir).name}",
    )


@hydra_command(PROGRAM, "app")  # a bad setting or an unreadable model: one line, status 2, before the server starts
def main(cfg: Any) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    port = number(cfg, "port", int)
    app = build_app(cfg)
    launch(app, str(cfg.host), port)


if __name__ == "__main__":
    raise SystemExit(main())
