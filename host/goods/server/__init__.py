"""The five servers of seed 000, one Starlette app each (``svcard serve goods-PARTY``)."""
