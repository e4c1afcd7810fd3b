"""Results: what every output is and where it lies; rows -> Parquet, JSON and PNG under --out.

`catalog` declares every table once (path under the writing job's --out, schema, row order);
`layout` names where each job's --out sits in a `jobs.reproduce` tree; `tables` is the one
Parquet/JSON writer and reader (atomic, fsspec: the only module here that opens files);
`state` stores accumulator state as plain arrays (no pickle); `png` encodes and decodes images;
`urls` joins URL strings. All but `tables` are declarations and codecs any package may import."""
