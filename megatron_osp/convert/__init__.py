"""Conversion between megatron-osp checkpoints and Hugging Face Llama directories.

``llama`` holds the tensor mapping (with SSNorm / EmbProj folding), ``hf_export`` writes an HF
directory from a checkpoint of any layout, ``hf_import`` writes a checkpoint from an HF Llama.
"""
