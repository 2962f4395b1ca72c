"""Runtime backends: module swaps that run quantized weights inside a diffusers UNet."""
