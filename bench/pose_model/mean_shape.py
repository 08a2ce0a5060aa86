"""Read dlib's 68-point mean shape out of face_recognition_models' shape predictor file.

The X/Y of runner.vision.faces.FACE_MODEL_3D (and MEAN_SHAPE_IN_BOX) come from here: the shape
predictor's initial shape is the mean of its iBUG 300-W training annotations, in units of the
detector box. Printed in millimetres with 90 mm between the outer eye corners, nose tip at 0.

    .venv/bin/python bench/pose_model/mean_shape.py

dlib serializes an int as one byte (size | 0x80 when negative) then the little-endian magnitude;
a float as two ints (mantissa, exponent); a matrix as -rows, -cols, then the elements; the shape
predictor starts with its version (1) and the initial shape (136 x 1: x0, y0, x1, y1, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

RIGID = (27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45)


def read_initial_shape(path: Path) -> np.ndarray:
    data = path.read_bytes()
    pos = 0

    def read_int() -> int:
        nonlocal pos
        head = data[pos]
        size, negative = head & 0x0F, head & 0x80
        value = int.from_bytes(data[pos + 1:pos + 1 + size], "little")
        pos += 1 + size
        return -value if negative else value

    version = read_int()
    if version != 1:
        sys.exit(f"{path}: shape predictor version {version}, this reader knows version 1")
    rows, cols = abs(read_int()), abs(read_int())
    values = []
    for _ in range(rows * cols):
        mantissa = read_int()
        values.append(mantissa * 2.0 ** read_int())
    return np.array(values).reshape(-1, 2)


def main() -> None:
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    unit = read_initial_shape(models / "shape_predictor_68_face_landmarks.dat")
    c = unit.mean(0)
    rms = float(np.sqrt(((unit - c) ** 2).sum(1).mean()))
    print(f"MEAN_SHAPE_IN_BOX = ({c[0]:.4f}, {c[1]:.4f}, {rms:.4f})")
    mm = (unit - unit[30]) * 90.0 / float(np.linalg.norm(unit[45] - unit[36]))
    for i in RIGID + (48, 54):
        print(f"{i:2d}: ({mm[i, 0]:6.1f}, {mm[i, 1]:6.1f})")
    print("eye centres:", mm[36:42].mean(0).round(1), mm[42:48].mean(0).round(1))


if __name__ == "__main__":
    main()
