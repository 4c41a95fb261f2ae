"""The host-independent core: torch + safetensors + numpy, and no WebUI, diffusers or demo import.

Grammar (:mod:`.numbers`, :mod:`.schedule`, :mod:`.tags`), network files and their maths
(:mod:`.networks`), name mapping (:mod:`.naming`), the per-step weight engine (:mod:`.combine`,
:mod:`.engine`, :mod:`.delta_cache`), positions on a sampler's noise grid (:mod:`.positions`),
merging (:mod:`.merge`), the network folders (:mod:`.library`) and the interface every host adapter
uses (:mod:`.session`). ``tests/test_boundaries.py`` checks the import rule.
"""
