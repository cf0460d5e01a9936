"""Settlement of seed 002: clearing of PSAM batches and loads into a ledger and settlement files,
and the audit that proves money is conserved."""
