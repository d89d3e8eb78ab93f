"""Framework-neutral parts of gdn: the spec (constants, tiling, contract) and the float64 reference."""
