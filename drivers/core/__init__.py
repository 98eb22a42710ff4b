"""The shared kernel both drivers/ and agent/ import: samples and frames, the clock, backoff, VIN rules."""
