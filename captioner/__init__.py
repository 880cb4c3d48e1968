"""The model room as one package (issue 17): model families, their specs, files and decoding.

Phase 1 holds the BLIP-2 family (LAVIS 1.0.2 `blip2_opt`, designed for `blip2_t5`); the BLIP v1
modules (blip2_model, fast_decode, model_spec, model_files, model_device, model_doctor) move in
later. Importing the package is cheap: torch, transformers and LAVIS load on first use only.
"""
