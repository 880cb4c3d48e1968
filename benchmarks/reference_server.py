"""A baseline server built like the reference service, for `benchmarks/load.py` only.

Flask's threaded development server, stock LAVIS `BlipCaption.generate` once per request, no lock
around the model, no batching, no cache: what the animal-farm BLIP2 service does. It loads the same
weights as ours (`MODEL_CONFIG` YAML, or large_coco from `MODEL_DIR`) so only serving differs.

    python benchmarks/reference_server.py --port P [--model-config YAML | --model-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-config", type=Path)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args(argv)

    import torch
    from flask import Flask, jsonify, request
    from PIL import Image

    import blip2_model

    if args.model_config:
        spec = blip2_model.yaml_spec(args.model_config)
    else:
        spec = blip2_model.lavis_spec("blip_caption", "large_coco", args.model_dir)
    model = blip2_model.build_model(spec)
    if spec.checkpoint is not None:
        blip2_model.load_checkpoint(model, spec.checkpoint)
    model.eval().to(args.device)
    transform = blip2_model.image_transform(spec)

    app = Flask(__name__)

    @app.route("/health")
    def health():  # type: ignore[no-untyped-def]
        return jsonify({"status": "healthy"})

    @app.route("/analyze", methods=["POST"])
    def analyze():  # type: ignore[no-untyped-def]
        started = time.time()
        image = Image.open(io.BytesIO(request.files["file"].read())).convert("RGB")
        with torch.no_grad():
            caption = model.generate({"image": transform(image).unsqueeze(0).to(args.device)})[0]
        return jsonify(
            {
                "metadata": {"processing_time": round(time.time() - started, 3)},
                "predictions": [{"text": caption.capitalize()}],
                "service": "blip2",
                "status": "success",
            }
        )

    app.run(host="127.0.0.1", port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
