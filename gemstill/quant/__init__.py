"""The one quantizer: `codec` (formats, GGUF blocks, fake_quant), `packed` (PackedWeight, below the model) and
`weights` (which parameters are quantized, and model-level round-to-nearest, packing and QAT)."""
