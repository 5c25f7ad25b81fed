"""Data: indexed datasets (.bin/.idx), the C++ index builders' Python face, tokenizers, preprocessing."""
