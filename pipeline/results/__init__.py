"""Results: rows -> Parquet, JSON and PNG under --out.

`tables` is the one Parquet/JSON writer and reader (atomic, fsspec); `layout` names every path
under a `jobs.reproduce` --out; `png` encodes and decodes images."""
