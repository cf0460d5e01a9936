"""The payment server: draws, debit answers, card proofs and batch closes with a pool of PSAMs,
and its transaction database."""
