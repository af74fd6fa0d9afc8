"""Export a Hugging Face decoder with TDA sparse MLPs to an ONNX graph built directly from its weights.

spec.py (what to build, from the HF config) -> weights.py (initializers, inline or streamed to
one external file) -> graph.py (node/value bookkeeping) -> decoder.py (the network) -> build.py (the
output directory: model, tokenizer, manifest, atomically).
"""
