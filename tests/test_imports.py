"""Planning must stay fast: building the stage registry may not import the heavy stacks.

A no-op `runner apply` has to finish well under a second, so every stage module keeps torch,
diffusers, transformers, dlib, cv2, av, insightface, numpy and PIL imports inside functions.
"""

import json
import subprocess
import sys

HEAVY = ["torch", "diffusers", "transformers", "peft", "accelerate", "dlib", "cv2", "av", "insightface",
         "onnxruntime", "numpy", "scipy", "PIL", "modal", "fastapi", "safetensors"]


def test_registry_and_cli_import_no_heavy_modules():
    code = (
        "import sys, json; import runner.cli; from runner.stages import registry; registry();"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [], f"imported while planning: {out}"
