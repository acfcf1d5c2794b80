"""Synthetic CT studies (phantoms written as valid DICOM series) for the demo, the tests and
the benchmarks. Not part of any service: no image ships it (.dockerignore).

    python -m synthetic.sample_studies OUTPUT_DIR     the demo's sample studies (scripts/demo.sh)
"""
