"""Data: indexed datasets (.bin/.idx), tokenizers, preprocessing, and GPT training samples.

Index building: ``shuffles`` (document and shuffle index), ``sample_index``, ``blending`` are the
Python faces of the C++ builders in csrc/ (int64, parallel, thread-count independent);
``gpt_dataset`` puts them together (splits, blends, ``__getitem__``) and ``index_cache`` stores the
result under a key that includes each data file's size and modification time.
"""
