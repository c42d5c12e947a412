"""Inference: batched ensemble sampling (sampling track) and token generation (compression track)."""
