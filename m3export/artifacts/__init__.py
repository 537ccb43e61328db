"""The artifact directory: its files, its manifest, its goldens, where it goes and how it is verified.
The only package that reads or writes `manifest.json` and the golden files.

Files: goldens.py (golden_*.npz: the only reader / writer; lazy `GoldenStore`), io.py (`PinnedFile`,
sha256, the one `atomic_write`, tool versions), layout.py (every path of a build), manifest.py (the
pydantic `Manifest`: the only reader / writer of manifest.json), outdir.py (what `--out` may replace,
the build lock, staging, atomic publish and its recovery), seal.py (manifest.sha256 and the HMAC
manifest.sig), verify.py (integrity: `verify_artifacts` -> `VerifiedArtifacts`).
"""
