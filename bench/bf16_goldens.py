"""How far a bf16 engine's logits stray from the float32 goldens `tda-export check` compares bf16 plans
with (tda_export/trt/goldens.py TOLERANCES). The torch backend running the engine in bf16 on the CPU
stands in for the plan, which needs a GPU.

    tda-export build -m smollm2-135m --dtype bf16 -o /tmp/smol-bf16
    python bench/bf16_goldens.py /tmp/smol-bf16
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from tda_export.runtime.torch_backend import TorchBackend
from tda_export.trt import goldens


def main(engine: Path) -> None:
    data = json.loads((engine / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        golden = dict(np.load(goldens.save(Path(tmp), engine / "model.onnx", data)))
    bf16 = TorchBackend.from_engine(engine / "model.onnx", data, device="cpu", max_batch=2, max_context=16,
                                    cuda_graphs=False)
    got = goldens.replay(bf16, data, golden["input_ids"], golden["attention_mask"], golden["tokens"])
    for step in ("prefill", *(f"decode{i}" for i in range(goldens.DECODE_STEPS))):
        err = np.abs(golden[step] - got[step])
        print(f"{step:8s} max |err| {err.max():.3f}  mean {err.mean():.3f}  p99 {np.quantile(err, 0.99):.3f}  "
              f"top-1 agree {(golden[step].argmax(-1) == got[step].argmax(-1)).sum()}/{len(err)}")
    ok, _ = goldens.compare(golden, got, *goldens.tolerance("bfloat16"))
    print(f"check's bf16 tolerance {goldens.tolerance('bfloat16')}: {'ok' if ok else 'MISMATCH'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
