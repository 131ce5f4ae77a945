"""Layer 1, core: config, environment, errors, the ledger and its typed records, atomic writes, downloads,
sealed caches, timing, the report and the notebook runner. Imports no other layer of the course."""
