"""The commands that run a build or the eager model, as library functions (`cli.py` only parses and
calls them).

Files: prompt.py (token ids, media and their placeholders -> graph inputs), media.py (image / video
preprocessing, bit-identical to transformers'), forward.py (`model forward`), run.py (`run`),
generate.py (`generate`), check.py (`check`, the CI gate, and its report files), outputs.py (files
written for the user: `--logits-out`, `spec from-hf -o`).
"""
