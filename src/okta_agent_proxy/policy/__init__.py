"""May they: authorization decisions as pure functions (pipeline step 5)."""
