"""The nightly evaluation: `select` (which committed models a night scores, by their store keys), `suites` (the
code that scores them), `history` (the DuckDB history, the comparison with the night before, the trend) and
`record` (a night appended and published). flows/nightly.py and tasks/nightly.py are thin Prefect layers over it."""
